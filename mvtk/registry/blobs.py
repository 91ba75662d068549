"""The registry's blob store: weights as safetensors files named by their SHA-256 (Lesson 04, §2 and §6).

`blobs/<2 hex>/<sha256>.safetensors` under the registry folder: identical weights are stored
once, every file is written atomically (`mvtk.files`), and reading verifies the checksum before
anything is decoded; nothing is ever unpickled. The store knows files, not versions: which blobs
are in use is the index's business.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load

from mvtk.errors import IntegrityError, InvalidArgumentError, RegistryError
from mvtk.files import abandoned_temps, sha256_bytes, sha256_file, write_bytes_atomic
from mvtk.registry.records import ModelVersion, is_sha256

__all__ = ["BlobStore", "BLOB_DIR", "BLOB_SUFFIX"]

BLOB_DIR = "blobs"
BLOB_SUFFIX = ".safetensors"


class BlobStore:
    """The content-addressed weights of one registry folder, `root/blobs` (Lesson 04, §2).

    Paths in messages and reports are relative to `root`, e.g. 'blobs/5e/5ed0....safetensors'.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.folder = self.root / BLOB_DIR

    def path(self, sha256: str) -> Path:
        """Where the weights with this SHA-256 live: blobs/<2 hex>/<sha256>.safetensors (Lesson 04, §2)."""
        if not is_sha256(sha256):
            raise InvalidArgumentError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
        return self.folder / sha256[:2] / f"{sha256}{BLOB_SUFFIX}"

    def put(self, sha256: str, data: bytes) -> None:
        """Store `data` under its SHA-256, unless an intact copy is there already (Lesson 04, §2).

        A damaged copy (its bytes no longer match the name) is replaced: registering the same weights
        again repairs it. Raises RegistryError naming the file when it cannot be written (a full disk).
        """
        path = self.path(sha256)
        try:
            if path.is_file() and sha256_file(path) == sha256:
                return  # identical weights are stored once
            write_bytes_atomic(path, data)  # on failure its temporary file is removed: nothing half-written stays
        except OSError as exc:  # a full disk, a read-only folder, no permission
            raise RegistryError(f"cannot write the weights file {self._relative(path)} in registry "
                                f"{str(self.root)!r}: {exc.strerror or exc}; nothing was registered") from exc

    def load(self, mv: ModelVersion, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of `mv` in their registered order, after checking the file's SHA-256 (Lesson 04, §6).

        Raises IntegrityError when the bytes changed since registration, RegistryError when the file is gone.
        """
        path = self.path(mv.sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"{mv.ref}: its weights file {self._relative(path)} is missing from the "
                                "blob store; restore it from a backup or delete the version") from None
        except OSError as exc:  # no permission, a folder where the file should be, an I/O error
            raise RegistryError(f"{mv.ref}: cannot read its weights file {self._relative(path)} in registry "
                                f"{str(self.root)!r}: {exc.strerror or exc}") from exc
        actual = sha256_bytes(data)
        if actual != mv.sha256:
            raise IntegrityError(f"{mv.ref}: the weights in {self._relative(path)} do not match the SHA-256 "
                                 f"recorded at registration (expected {mv.sha256[:12]}..., got {actual[:12]}...); "
                                 "the file changed after it was registered: restore it or register again")
        tensors = safetensors_load(data)
        return {key: tensors[key] if device is None else tensors[key].to(device) for key in mv.tensor_keys}

    def status(self, sha256: str) -> str:
        """'ok', 'missing' or 'corrupt' (the bytes no longer match the SHA-256) (Lesson 04, §6)."""
        path = self.path(sha256)
        if not path.is_file():
            return "missing"
        return "ok" if sha256_file(path) == sha256 else "corrupt"

    def leftovers(self, used: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(blobs no SHA-256 in `used` names, temporary files of writers that died), relative to root (Lesson 04, §6).

        A temporary file whose writer is still running is neither: it may be a register in progress.
        """
        folders = sorted(p for p in self.folder.glob("*") if p.is_dir())
        orphans = tuple(self._relative(p) for folder in folders for p in sorted(folder.glob(f"*{BLOB_SUFFIX}"))
                        if p.is_file() and not p.name.startswith(".") and p.name[:-len(BLOB_SUFFIX)] not in used)
        temps = tuple(self._relative(p) for folder in folders
                      for p in abandoned_temps(folder, lambda target: target.endswith(BLOB_SUFFIX)))
        return orphans, temps

    def remove(self, relative: str) -> None:
        """Delete one file of the store, named relative to root as `leftovers` names it (Lesson 04, §2)."""
        path = self.root / relative
        if path.parent.parent != self.folder:
            raise InvalidArgumentError(f"{relative!r} is not a file of the blob store {BLOB_DIR}/<2 hex>/")
        path.unlink(missing_ok=True)

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()
