"""Save, load and checkpoint models: exact resume, safe loading, integrity, signatures, encryption (Lesson 03).

Import everything from here (`from mvtk.checkpoint import save_checkpoint`). The files hold the
code, each importing only the files listed above it; by section of Lesson 03:

- `_io.py`: atomic writes with clear errors, hashing ("blake3:<hex>" digests) (§6; used by §2, §3, §5, §7)
- `crypto.py`: §7 encryption at rest (AES-GCM keys, encrypt_bytes, decrypt_bytes)
- `signing.py`: §7 tamper evidence (Ed25519 key pairs, sign_file, verify_file: detached `path.sig` holding
  signed BLAKE3 digests, or the SHA-256 ones of earlier versions;
  replacing_signed: a re-save that is verifiable at every instant, one writer at a time;
  reading_signed: a read that a concurrent re-save cannot fail)
- `core.py`: §2 a full training checkpoint, §4 exact resume (RNG states), §6 integrity and clear
  errors (save/load/read_checkpoint, seal/unseal: a BLAKE3 checksum in the file, SHA-256 in
  format-1 files; check_state_dict_fits)
- `program.py`: §5 torch.export programs as bytes, loaded only after a scan for planted code
  (export_program, check_pt2_archive, load_program; Lesson 07 re-exports the scan)
- `weights.py`: §5 safe loading without pickle (save_weights, load_weights: safetensors)
- `periodic.py`: §3 periodic checkpointing, §4 where to resume from (ModelCheckpoint, latest_checkpoint)

§1 (what a model's state is) and §8 (what saving costs) use plain PyTorch and the helpers above.
"""
from __future__ import annotations

from mvtk.checkpoint.core import (FORMAT, FORMAT_VERSION, check_plain, check_state_dict_fits, checkpoint_payload,
                                  load_checkpoint, read_checkpoint, restore_rng_state, rng_state, save_checkpoint,
                                  seal, unseal)
from mvtk.checkpoint.crypto import (ENCRYPTED_MAGIC, KEY_ENV_VAR, NONCE_BYTES, decrypt_bytes, encrypt_bytes,
                                    encrypted_for, load_key, new_key)
from mvtk.checkpoint.signing import (SIGNATURE_SUFFIX, check_signing_key, check_verify_key, file_record, key_id,
                                     load_private_key, load_public_key, new_signing_key, read_signature, reading_signed,
                                     record_digest, replacing_signed,
                                     sign_file, sign_statement, signature_path, verify_file, verify_statement,
                                     write_signature)
from mvtk.checkpoint.program import (BATCH_DIM, PT2_TEXT_ENTRIES, ExportedModule, check_pt2_archive, export_program,
                                     load_program)
from mvtk.checkpoint.periodic import LAST_NAME, ModelCheckpoint, latest_checkpoint
from mvtk.checkpoint.weights import WEIGHTS_SHA256_KEY, check_plain_tensors, load_weights, save_weights, weights_digest
from mvtk.files import remove_stale_temps
from mvtk.env import git_commit  # lesson 03 §5 shows what save_checkpoint records: ckpt.git_commit()

__all__ = [
    # §1-§2, §4, §6: full checkpoints, exact resume, integrity (core)
    "FORMAT", "FORMAT_VERSION", "check_plain", "check_state_dict_fits", "checkpoint_payload", "load_checkpoint",
    "read_checkpoint", "restore_rng_state", "rng_state", "save_checkpoint", "seal", "unseal",
    "remove_stale_temps", "git_commit",
    # §3: periodic checkpointing (periodic)
    "LAST_NAME", "ModelCheckpoint", "latest_checkpoint",
    # §5: weights without pickle (weights); torch.export programs, scanned before loading (program)
    "BATCH_DIM", "PT2_TEXT_ENTRIES", "ExportedModule", "check_pt2_archive", "export_program", "load_program",
    "WEIGHTS_SHA256_KEY", "check_plain_tensors", "load_weights", "save_weights", "weights_digest",
    # §7: encryption at rest (crypto)
    "ENCRYPTED_MAGIC", "KEY_ENV_VAR", "NONCE_BYTES", "decrypt_bytes", "encrypt_bytes", "encrypted_for", "load_key",
    "new_key",
    # §7: tamper evidence (signing)
    "SIGNATURE_SUFFIX", "check_signing_key", "check_verify_key", "file_record", "key_id", "load_private_key",
    "load_public_key", "new_signing_key",
    "read_signature", "reading_signed", "record_digest", "replacing_signed", "sign_file", "sign_statement",
    "signature_path", "verify_file",
    "verify_statement", "write_signature",
]
