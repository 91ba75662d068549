"""What a service is told: which registry, model and alias, where to listen, how to batch (Lesson 10, §3).

`ServeConfig` is the one place every setting lives, with defaults right for the course; the command
line (`python -m mvtk.serve --help`) is generated from its fields, so the two never disagree.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields, replace

from mvtk.errors import InvalidArgumentError, check_int, check_number
from mvtk.registry import DEFAULT_ROOT_ENV, check_alias, check_name

__all__ = ["ServeConfig", "parse_args", "to_args", "DEFAULT_HOST", "DEFAULT_PORT"]

DEFAULT_HOST = "127.0.0.1"  # only this machine can connect; a container publishes it on purpose (Dockerfile)
DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ServeConfig:
    """Every setting of the service, with the course's defaults (Lesson 10, §3)."""
    registry: str = "registry"        # the registry folder (default: $MVTK_REGISTRY, else ./registry),
    #                                   or an MLflow server's URL such as http://127.0.0.1:5000 (Lesson 11, §6)
    model: str = "digits"             # the registered name to serve
    alias: str = "production"         # the alias to follow: the service serves whatever it points to
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    cache_dir: str = "runs/serve-cache"  # ONNX exports, one per weights SHA-256 (Predictor.from_registry)
    batching: bool = True             # False: one ONNX Runtime call per request
    max_batch: int = 64               # rows per ONNX Runtime call, at most
    max_wait_ms: float = 2.0          # how long a batch waits for more requests after the first
    max_body_bytes: int = 1 << 20     # larger request bodies get 413
    max_rows: int = 1024              # more images (rows) in one request get 413
    body_timeout_s: float = 10.0      # a request body that sends nothing for this long gets 408
    shutdown_timeout_s: float = 15.0  # after SIGTERM, in-flight requests get this long to finish, then are cut
    poll_s: float = 0.5               # how often the watcher reads the alias
    retry_s: float = 30.0             # a version that failed verification is tried again after this long
    drift_window: int = 200           # the last N served images are scored for drift (>= 100)
    drift_threshold: float = 0.2      # mean PSI above this raises the alarm (Lesson 08)
    drift_reference: str = "digits"   # the training split of this data set, or a .npy file, or "" for none
    verify_key: str = ""              # an Ed25519 public key (PEM): versions must be signed by its private key
    threads: int = 1                  # ONNX Runtime threads per call
    bootstrap: bool = False           # train and register the course MLP first when the registry holds no model
    log_level: str = "warning"
    input_shape: str = ""             # one sample's shape, no batch dimension, e.g. "3,32,32": needed for a model
    #                                   that is not a course model ("" : the course model's own)

    def __post_init__(self):
        check_name(self.model, "model")
        check_alias(self.alias)
        check_int(self.port, "port", low=0, high=65535)
        check_int(self.max_batch, "max_batch", low=1, high=4096)
        check_number(self.max_wait_ms, "max_wait_ms", low=0, high=10_000)
        check_int(self.max_body_bytes, "max_body_bytes", low=1024)
        check_int(self.max_rows, "max_rows", low=1)
        check_number(self.body_timeout_s, "body_timeout_s", low=0.1, high=3600)
        check_number(self.shutdown_timeout_s, "shutdown_timeout_s", low=0.1, high=3600)
        check_number(self.poll_s, "poll_s", low=0.01, high=3600)
        check_number(self.retry_s, "retry_s", low=0.1, high=86400)
        check_int(self.drift_window, "drift_window", low=100)
        check_number(self.drift_threshold, "drift_threshold", low=0, low_open=True)
        check_int(self.threads, "threads", low=1, high=256)
        self.sample_shape  # noqa: B018 - refuses a malformed input_shape now, not in the service
        for name in ("batching", "bootstrap"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, **overrides) -> "ServeConfig":
        """The defaults, with the registry from $MVTK_REGISTRY when set, then `overrides` (Lesson 10, §3)."""
        registry = os.environ.get(DEFAULT_ROOT_ENV) or cls.registry
        return replace(cls(registry=registry), **overrides)

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """input_shape as ints, e.g. (3, 32, 32); None when not given (Lesson 10, §3)."""
        if not isinstance(self.input_shape, str):
            raise InvalidArgumentError(f"input_shape must be a str such as '3,32,32', got {self.input_shape!r}")
        if not self.input_shape.strip():
            return None
        parts = self.input_shape.replace("x", ",").split(",")
        if not all(p.strip().isdigit() and int(p) > 0 for p in parts) or len(parts) > 8:
            raise InvalidArgumentError(f"input_shape must be one sample's shape without the batch dimension, "
                                       f"1 to 8 positive ints separated by commas (e.g. '3,32,32'), "
                                       f"got {self.input_shape!r}")
        return tuple(int(p) for p in parts)

    @property
    def ref(self) -> str:
        """What is served, e.g. 'digits@production' (Lesson 10, §3)."""
        return f"{self.model}@{self.alias}"


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    """A ServeConfig from `python -m mvtk.serve` arguments, one `--field` per setting (Lesson 10, §3).

    A value the settings refuse (e.g. `--model ../evil`) ends the program like any argparse error: one line, exit 2.
    """
    parser = argparse.ArgumentParser(prog="python -m mvtk.serve",
                                     description="Serve a registry alias over HTTP (mvtk, Lesson 10).")
    defaults = ServeConfig.from_env()
    for field in fields(ServeConfig):
        default = getattr(defaults, field.name)
        kind = _flag if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=default,
                            help=f"default: {default!r}")
    try:
        return ServeConfig(**vars(parser.parse_args(argv)))
    except InvalidArgumentError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def to_args(config: ServeConfig) -> list[str]:
    """The command-line arguments that give back `config` through parse_args (Lesson 10, §3)."""
    return [part for key, value in asdict(config).items()
            for part in (f"--{key.replace('_', '-')}", str(value))]
