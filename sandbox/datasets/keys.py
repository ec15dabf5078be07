"""Key providers: wrap and unwrap per-dataset-version data keys with a master key.

Envelope encryption (design §5): every dataset version is encrypted with its own random
32-byte data key (:func:`new_data_key`); only the *wrapped* data key is stored.  A
:class:`KeyProvider` holds the master key (a local key file by default, a KMS such as
Vault transit as an option).  Rotating the master key rewraps data keys without
re-encrypting data; destroying a wrapped data key crypto-shreds that version.

No message or ``repr`` produced here contains key material.
"""

from __future__ import annotations

import abc
import hashlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DATA_KEY_BYTES",
    "KeyProvider",
    "KeyUnavailable",
    "LocalKeyFileProvider",
    "new_data_key",
]

#: Length of master keys and data keys (AES-256).
DATA_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
#: First byte of a wrapped key produced by :class:`LocalKeyFileProvider` (format version).
_WRAP_FORMAT = b"\x01"


class KeyUnavailable(Exception):
    """A key cannot be used: missing or unsafe key file, wrong master key, corrupted blob.

    Messages name the key file or key id, never key material.
    """


def new_data_key() -> bytes:
    """Return a fresh random 32-byte data key (from the OS CSPRNG)."""
    return secrets.token_bytes(DATA_KEY_BYTES)


class KeyProvider(abc.ABC):
    """Wraps data keys under a master key.

    Contract: ``unwrap(wrap(k, context=c), context=c) == k``; unwrapping with another
    context, another master key or a modified blob raises :class:`KeyUnavailable`.
    The ``context`` (e.g. ``b"dataset:<id>:v<version>"``) is authenticated, so a wrapped
    key cannot be moved to another dataset version.
    """

    @property
    @abc.abstractmethod
    def key_id(self) -> str:
        """A stable, non-secret identifier of the master key (stored next to wrapped keys)."""

    @abc.abstractmethod
    def wrap(self, data_key: bytes, *, context: bytes) -> bytes:
        """Encrypt ``data_key`` under the master key, binding ``context``."""

    @abc.abstractmethod
    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:
        """Return the data key inside ``wrapped``; raise :class:`KeyUnavailable` on any failure."""


class LocalKeyFileProvider(KeyProvider):
    """Master key in a local file: exactly 32 raw random bytes, mode 0600.

    Opening refuses a missing file, a file of the wrong size and a file that the group
    or others can access (any of mode bits 0o077), raising :class:`KeyUnavailable`.

    Wrapped format: ``0x01 | nonce (12) | AES-256-GCM(data_key) | tag (16)`` with the
    context as associated data.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        try:
            fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise KeyUnavailable(f"master key file {str(self._path)!r} does not exist") from None
        except OSError as exc:
            raise KeyUnavailable(
                f"cannot open master key file {str(self._path)!r}: {exc.strerror}"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyUnavailable(f"master key file {str(self._path)!r} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeyUnavailable(
                    f"master key file {str(self._path)!r} has mode {mode:04o}, readable beyond "
                    f"its owner; run: chmod 600 {self._path}"
                )
            key = os.read(fd, DATA_KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(key) != DATA_KEY_BYTES:
            raise KeyUnavailable(
                f"master key file {str(self._path)!r} must hold exactly {DATA_KEY_BYTES} bytes"
            )
        self._aead = AESGCM(key)
        self._key_id = hashlib.sha256(key).hexdigest()[:16]

    @classmethod
    def create(cls, path: Path) -> LocalKeyFileProvider:
        """Write a new random master key to ``path`` (mode 0600) and open it.

        Refuses to overwrite: raises ``FileExistsError`` if ``path`` exists.  The parent
        directory must exist.  The key appears at ``path`` whole or not at all (written
        and synced under a temporary name, then hard-linked into place), so another
        process listing the directory never reads a partial key; on a failure the
        temporary file is removed.
        """
        path = Path(path)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
        flags = (
            os.O_WRONLY
            | os.O_CREAT
            | os.O_EXCL
            | getattr(os, "O_CLOEXEC", 0)
            | getattr(os, "O_NOFOLLOW", 0)
        )
        if path.exists():
            raise FileExistsError(f"refusing to overwrite existing master key file {str(path)!r}")
        fd = os.open(temp, flags, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                key = secrets.token_bytes(DATA_KEY_BYTES)
                view = memoryview(key)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(temp, path)  # atomic, and fails if the name exists
            except FileExistsError:
                raise FileExistsError(
                    f"refusing to overwrite existing master key file {str(path)!r}"
                ) from None
        finally:
            temp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return cls(path)

    @property
    def path(self) -> Path:
        """The key file path."""
        return self._path

    @property
    def key_id(self) -> str:
        """First 16 hex characters of SHA-256 of the master key."""
        return self._key_id

    def wrap(self, data_key: bytes, *, context: bytes) -> bytes:
        """Encrypt a 32-byte ``data_key`` with AES-256-GCM, random nonce, ``context`` as AAD."""
        if len(data_key) != DATA_KEY_BYTES:
            raise ValueError(f"data keys must be {DATA_KEY_BYTES} bytes, got {len(data_key)}")
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return _WRAP_FORMAT + nonce + self._aead.encrypt(nonce, bytes(data_key), bytes(context))

    def unwrap(self, wrapped: bytes, *, context: bytes) -> bytes:
        """Decrypt a wrapped key; wrong master key, context or a modified blob → KeyUnavailable."""
        expected = 1 + _NONCE_BYTES + DATA_KEY_BYTES + _TAG_BYTES
        if len(wrapped) != expected or wrapped[:1] != _WRAP_FORMAT:
            raise KeyUnavailable(
                f"wrapped data key is malformed (expected {expected} bytes, format 1)"
            )
        nonce, body = wrapped[1 : 1 + _NONCE_BYTES], wrapped[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(bytes(nonce), bytes(body), bytes(context))
        except InvalidTag:
            raise KeyUnavailable(
                f"cannot unwrap data key with master key {self._key_id}: wrong master key, "
                "wrong context or corrupted wrapped key"
            ) from None

    def __repr__(self) -> str:
        return f"LocalKeyFileProvider(path={str(self._path)!r}, key_id={self._key_id!r})"


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable (best effort where directories cannot be
    opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
