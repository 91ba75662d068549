"""The registry's blob store: weights as safetensors files named by their SHA-256 (Lesson 04, §2 and §6).

`blobs/<2 hex>/<sha256>.safetensors` under the registry folder: identical weights are stored
once, every file is written atomically (`mvtk.files`), and reading verifies the checksum before
anything is decoded; nothing is ever unpickled. The store knows files, not versions: which blobs
are in use is the index's business.
"""
from __future__ import annotations

import stat
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load

from mvtk.errors import IntegrityError, InvalidArgumentError, RegistryError
from mvtk.files import abandoned_temps, sha256_bytes, sha256_file, write_bytes_atomic
from mvtk.registry.records import ModelVersion, is_sha256

__all__ = ["BlobStore", "BLOB_DIR", "BLOB_SUFFIX", "PROGRAM_SUFFIX"]

BLOB_DIR = "blobs"
BLOB_SUFFIX = ".safetensors"
PROGRAM_SUFFIX = ".pt2"  # a version's torch.export program, stored beside the weights


class BlobStore:
    """The content-addressed weights of one registry folder, `root/blobs` (Lesson 04, §2).

    Paths in messages and reports are relative to `root`, e.g. 'blobs/5e/5ed0....safetensors'.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.folder = self.root / BLOB_DIR

    def path(self, sha256: str, suffix: str = BLOB_SUFFIX) -> Path:
        """Where the weights (or, with PROGRAM_SUFFIX, the program) with this SHA-256 live (Lesson 04, §2).

        blobs/<2 hex>/<sha256>.safetensors, or blobs/<2 hex>/<sha256>.pt2.
        """
        if not is_sha256(sha256):
            raise InvalidArgumentError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
        if suffix not in (BLOB_SUFFIX, PROGRAM_SUFFIX):
            raise InvalidArgumentError(f"suffix must be {BLOB_SUFFIX!r} or {PROGRAM_SUFFIX!r}, got {suffix!r}")
        return self.folder / sha256[:2] / f"{sha256}{suffix}"

    def put(self, sha256: str, data: bytes, suffix: str = BLOB_SUFFIX) -> None:
        """Store `data` under its SHA-256, unless an intact copy is there already (Lesson 04, §2).

        A damaged copy (its bytes no longer match the name) is replaced: registering the same weights
        again repairs it. So is a symlink or a special file where the file should be; an empty folder
        there is removed, a folder holding anything is refused. Raises RegistryError naming the file
        when it cannot be written (a full disk, a folder in its way).
        """
        path = self.path(sha256, suffix)
        try:
            kind = self.kind(path)
            if kind == "file" and sha256_file(path) == sha256:
                return  # identical weights are stored once
            if kind == "folder" and any(path.iterdir()):
                raise RegistryError(f"cannot write the weights file {self._relative(path)} in registry "
                                    f"{str(self.root)!r}: a folder holding files stands there; move it away and "
                                    "register again; nothing was registered")
            if kind == "folder":
                path.rmdir()
            write_bytes_atomic(path, data)  # on failure its temporary file is removed: nothing half-written stays
        except OSError as exc:  # a full disk, a read-only folder, no permission, a folder in the way
            raise RegistryError(f"cannot write the weights file {self._relative(path)} in registry "
                                f"{str(self.root)!r}: {exc.strerror or exc}; nothing was registered") from exc

    def load(self, mv: ModelVersion, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of `mv` in their registered order, after checking the file's SHA-256 (Lesson 04, §6).

        Raises IntegrityError when the bytes changed since registration, RegistryError when the file is gone.
        """
        data = self.read(mv, mv.sha256, BLOB_SUFFIX)
        tensors = safetensors_load(data)
        return {key: tensors[key] if device is None else tensors[key].to(device) for key in mv.tensor_keys}

    def read(self, mv: ModelVersion, sha256: str, suffix: str = BLOB_SUFFIX) -> bytes:
        """The bytes of one of `mv`'s files (weights or program), after checking their SHA-256 (Lesson 04, §6).

        Raises IntegrityError when the bytes changed since registration, RegistryError when the file is gone.
        """
        path = self.path(sha256, suffix)
        what = "weights" if suffix == BLOB_SUFFIX else "program"
        kind = self.kind(path)
        if kind not in ("file", "missing"):  # never follow a link or block on a fifo: the store holds plain files
            raise RegistryError(f"{mv.ref}: its {what} file {self._relative(path)} in registry {str(self.root)!r} is "
                                f"a {kind}, not a regular file; register the same weights again to replace it")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"{mv.ref}: its {what} file {self._relative(path)} is missing from the "
                                "blob store; restore it from a backup or delete the version") from None
        except OSError as exc:  # no permission, a folder where the file should be, an I/O error
            raise RegistryError(f"{mv.ref}: cannot read its {what} file {self._relative(path)} in registry "
                                f"{str(self.root)!r}: {exc.strerror or exc}") from exc
        actual = sha256_bytes(data)
        if actual != sha256:
            raise IntegrityError(f"{mv.ref}: the {what} in {self._relative(path)} do not match the SHA-256 "
                                 f"recorded at registration (expected {sha256[:12]}..., got {actual[:12]}...); "
                                 "the file changed after it was registered: restore it or register again")
        return data

    def status(self, sha256: str, suffix: str = BLOB_SUFFIX) -> str:
        """'ok', 'missing' or 'corrupt' (Lesson 04, §6).

        Corrupt: the bytes no longer match the SHA-256, or a folder, symlink or special file stands
        where the file should be (registering the same weights again replaces it).
        """
        path = self.path(sha256, suffix)
        kind = self.kind(path)
        if kind != "file":
            return "missing" if kind == "missing" else "corrupt"
        return "ok" if sha256_file(path) == sha256 else "corrupt"

    def holds_files(self) -> bool:
        """True when anything but empty folders is under blobs/: weights, programs, temporary files (Lesson 04, §2)."""
        return self.folder.is_dir() and any(not p.is_dir() or p.is_symlink() for p in self.folder.rglob("*"))

    @staticmethod
    def kind(path: Path) -> str:
        """What is at `path`, links not followed: 'file', 'missing', 'folder', 'symlink' or 'special file' (Lesson 04, §6)."""
        try:
            mode = path.lstat().st_mode
        except (FileNotFoundError, NotADirectoryError):  # NotADirectory: a file where blobs/<2 hex>/ should be
            return "missing"
        if stat.S_ISLNK(mode):
            return "symlink"
        return "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "special file"

    def leftovers(self, used: set[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(blobs no SHA-256 in `used` names, temporary files of writers that died), relative to root (Lesson 04, §6).

        A temporary file whose writer is still running is neither: it may be a register in progress.
        """
        folders = sorted(p for p in self.folder.glob("*") if p.is_dir())
        suffixes = (BLOB_SUFFIX, PROGRAM_SUFFIX)
        orphans = tuple(self._relative(p) for folder in folders for p in sorted(folder.iterdir())
                        if p.is_file() and not p.name.startswith(".") and p.name.endswith(suffixes)
                        and p.name.rsplit(".", 1)[0] not in used)
        temps = tuple(self._relative(p) for folder in folders
                      for p in abandoned_temps(folder, lambda target: target.endswith(suffixes)))
        return orphans, temps

    def remove(self, relative: str) -> None:
        """Delete one file of the store, named relative to root as `leftovers` names it (Lesson 04, §2)."""
        path = self.root / relative
        if path.parent.parent != self.folder:
            raise InvalidArgumentError(f"{relative!r} is not a file of the blob store {BLOB_DIR}/<2 hex>/")
        path.unlink(missing_ok=True)

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()
