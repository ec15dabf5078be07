"""Keyrings: the master keys a deployment holds, by key id, with rotation and retirement.

Every dataset version stores the id of the master key that wrapped its data key. A
keyring answers ``provider(key_id)`` for unwrapping and ``current()`` (the newest key) for
wrapping. Rotation (``sandbox keys rotate``) creates a new master key, rewraps every data
key under it in one database transaction (no data is re-encrypted), and can then retire
the old key once nothing refers to it.

Backends:
- ``LocalKeyring``: 0600 files ``master-<generation>.key`` in a 0700 directory (default).
- ``Pkcs11Keyring`` (``sandbox.datasets.pkcs11``): non-extractable AES keys inside an HSM
  or SoftHSM token; wrapping happens inside the token.
"""

from __future__ import annotations

import abc
import os
import re
import time
from pathlib import Path

from sandbox.datasets.keys import KeyProvider, KeyUnavailable, LocalKeyFileProvider

_LOCAL_NAME = re.compile(r"^master-(\d{4,})\.key$")


class Keyring(abc.ABC):
    """The set of master keys; see the module docstring for the contract."""

    @abc.abstractmethod
    def key_ids(self) -> list[str]:
        """Ids of every master key held, oldest first."""

    @abc.abstractmethod
    def provider(self, key_id: str) -> KeyProvider:
        """The provider for ``key_id``; ``KeyUnavailable`` if this keyring lacks it."""

    @abc.abstractmethod
    def create_next(self) -> KeyProvider:
        """Create a new master key; it becomes ``current()`` at once."""

    @abc.abstractmethod
    def retire(self, key_id: str) -> None:
        """Destroy a master key. Callers check first that no data key needs it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions held with a key store (nothing for key files)."""

    def current(self) -> KeyProvider:
        """The newest master key: new data keys are wrapped under it."""
        ids = self.key_ids()
        if not ids:
            raise KeyUnavailable("the keyring holds no master key")
        return self.provider(ids[-1])


class LocalKeyring(Keyring):
    """Master keys as files in ``directory`` (created 0700; each key file 0600)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._cache: dict[str, LocalKeyFileProvider] = {}

    @classmethod
    def create(cls, directory: Path) -> LocalKeyring:
        """A new keyring with its first key; refuses a directory that already has keys."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ring = cls(directory)
        if ring._files():
            raise FileExistsError(f"{directory} already holds master keys")
        ring.create_next()
        return ring

    def _files(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _LOCAL_NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _providers(self) -> list[LocalKeyFileProvider]:
        providers = []
        for _gen, path in self._files():
            provider = LocalKeyFileProvider(path)
            self._cache[provider.key_id] = provider
            providers.append(provider)
        return providers

    def key_ids(self) -> list[str]:
        return [p.key_id for p in self._providers()]

    def provider(self, key_id: str) -> KeyProvider:
        if key_id not in self._cache:
            self._providers()
        try:
            return self._cache[key_id]
        except KeyError:
            raise KeyUnavailable(f"master key {key_id} is not in {self.directory}") from None

    def create_next(self) -> KeyProvider:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sweep_leftovers()
        for _attempt in range(10):  # another process may take the same generation first
            files = self._files()
            generation = files[-1][0] + 1 if files else 1
            try:
                provider = LocalKeyFileProvider.create(
                    self.directory / f"master-{generation:04d}.key")
            except FileExistsError:
                continue
            self._cache[provider.key_id] = provider
            return provider
        raise FileExistsError(f"could not create a new master key in {self.directory}: "
                              "other processes keep taking the next generation")

    def _sweep_leftovers(self, older_than: float = 600.0) -> None:
        """Destroy what a process that died mid-way left: keys being retired
        (``.master-N.key.retired``) at once, keys being created (``.partial``, never used
        by anything) once ``older_than`` seconds old (a live creation takes
        milliseconds)."""
        for path in self.directory.glob(".master-*.key.*"):
            try:
                if path.name.endswith(".retired") or (
                        path.name.endswith(".partial")
                        and time.time() - path.stat().st_mtime > older_than):
                    _shred(path)
            except FileNotFoundError:
                continue

    def retire(self, key_id: str) -> None:
        provider = self.provider(key_id)
        assert isinstance(provider, LocalKeyFileProvider)
        # first out of the keyring's sight in one step (a process listing the directory
        # meanwhile sees the key or nothing, never a half-zeroed file), then overwrite
        # (best effort) and unlink
        doomed = provider.path.with_name(f".{provider.path.name}.retired")
        os.replace(provider.path, doomed)
        _shred(doomed)
        self._cache.pop(key_id, None)


def _shred(path: Path) -> None:
    """Overwrite a key file with zeros, sync, and remove it (best effort on media that
    remap writes)."""
    with open(path, "r+b") as handle:
        handle.write(b"\0" * os.fstat(handle.fileno()).st_size)
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()
