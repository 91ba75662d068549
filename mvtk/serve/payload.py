"""Reading a predict request: a size limit first, then JSON, then numbers of the right shape (Lesson 10, §4).

Every refusal is a `RequestError` with the HTTP status to send (408 for a body that stalls, 413 for
a body over the limit, 415 for a Content-Type that is not JSON, 422 for everything else) and a
message that names what was wrong and what was expected.
"""
from __future__ import annotations

import asyncio
import json

import numpy as np

__all__ = ["RequestError", "read_body", "parse_inputs"]


class RequestError(Exception):
    """A request the service refuses: an HTTP status and a message naming the problem (Lesson 10, §4)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(request, limit: int, timeout_s: float = 10.0) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes, before it is all read (Lesson 10, §4).

    A Content-Type other than application/json gets 415 (none at all is read as JSON); a body that sends
    nothing for `timeout_s` seconds gets 408, so a stalled client holds no request (or shutdown) forever.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind != "application/json":
        raise RequestError(415, f"Content-Type {kind!r} is not supported; send the body as application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes; "
                                "send fewer images per request")
    body, chunks = bytearray(), request.stream()
    while True:
        try:
            async with asyncio.timeout(timeout_s):  # no task per chunk, unlike asyncio.wait_for
                chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise RequestError(408, f"the request body stalled: no bytes for {timeout_s:g} s after {len(body)} "
                                    "bytes; send the whole body without pausing") from None
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes; send fewer images per request")
    return bytes(body)


def parse_inputs(body: bytes, input_shape: tuple[int, ...]) -> np.ndarray:
    """`{"inputs": ...}` with one image or a batch, as a float32 (N, *input_shape) array, or 422 (Lesson 10, §4)."""
    shape = ", ".join(map(str, input_shape))
    expected = f'a JSON object {{"inputs": ...}} holding one image of shape ({shape}) or a batch of shape (N, {shape})'
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(422, f"body is not JSON ({exc}); expected {expected}") from None
    except RecursionError:
        raise RequestError(422, f"body is nested too deeply to read; expected {expected}") from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise RequestError(422, f"body holds a number too large to read ({exc}); expected {expected}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise RequestError(422, f"expected {expected}, got {type(payload).__name__}"
                                f"{' with keys ' + str(sorted(payload)) if isinstance(payload, dict) else ''}")
    try:
        array = np.asarray(payload["inputs"])
    except RecursionError:
        raise RequestError(422, f"inputs are nested too deeply; expected {expected}") from None
    except (ValueError, TypeError) as exc:
        if "maximum number of dimension" in str(exc):  # numpy: more than 64 nested lists
            raise RequestError(422, f"inputs are nested too deeply ({exc}); expected {expected}") from None
        raise RequestError(422, f"inputs are ragged (rows of different lengths); expected {expected}") from None
    if array.dtype.kind not in "iuf":
        found = {"b": "true/false", "U": "strings", "O": "null, nested objects or numbers too large"}
        raise RequestError(422, f"inputs must be numbers (float32 pixel values), got "
                                f"{found.get(array.dtype.kind, array.dtype.name)}")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    return array[None] if array.shape == tuple(input_shape) else array
