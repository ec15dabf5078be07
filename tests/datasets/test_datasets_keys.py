"""Tests for sandbox.datasets.keys."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from sandbox.datasets.keys import (
    KeyProvider,
    KeyUnavailable,
    LocalKeyFileProvider,
    new_data_key,
)

CTX = b"dataset:d1:v1"


@pytest.fixture
def provider(tmp_path: Path) -> LocalKeyFileProvider:
    return LocalKeyFileProvider.create(tmp_path / "master.key")


def test_create_writes_0600_key_and_key_id(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    provider = LocalKeyFileProvider.create(path)
    assert isinstance(provider, KeyProvider)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_bytes()
    assert len(key) == 32
    assert provider.key_id == hashlib.sha256(key).hexdigest()[:16]
    assert LocalKeyFileProvider(path).key_id == provider.key_id


def test_create_refuses_to_overwrite(provider: LocalKeyFileProvider) -> None:
    before = provider.path.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        LocalKeyFileProvider.create(provider.path)
    assert provider.path.read_bytes() == before


def test_wrap_unwrap_round_trip(provider: LocalKeyFileProvider) -> None:
    data_key = new_data_key()
    wrapped = provider.wrap(data_key, context=CTX)
    assert data_key not in wrapped
    assert provider.wrap(data_key, context=CTX) != wrapped  # random nonce
    assert provider.unwrap(wrapped, context=CTX) == data_key
    assert LocalKeyFileProvider(provider.path).unwrap(wrapped, context=CTX) == data_key


def test_wrong_context_fails(provider: LocalKeyFileProvider) -> None:
    wrapped = provider.wrap(new_data_key(), context=CTX)
    with pytest.raises(KeyUnavailable, match="wrong master key, wrong context"):
        provider.unwrap(wrapped, context=b"dataset:d1:v2")


def test_wrong_master_key_fails_without_leaking(
    provider: LocalKeyFileProvider, tmp_path: Path
) -> None:
    other = LocalKeyFileProvider.create(tmp_path / "other.key")
    data_key = new_data_key()
    wrapped = provider.wrap(data_key, context=CTX)
    with pytest.raises(KeyUnavailable) as info:
        other.unwrap(wrapped, context=CTX)
    message = str(info.value) + repr(other) + repr(provider)
    for secret in (data_key, provider.path.read_bytes(), other.path.read_bytes()):
        assert secret.hex() not in message
        assert repr(secret)[2:-1] not in message


@pytest.mark.parametrize("mutation", ["flip", "short", "format"])
def test_tampered_wrapped_key_fails(provider: LocalKeyFileProvider, mutation: str) -> None:
    wrapped = bytearray(provider.wrap(new_data_key(), context=CTX))
    if mutation == "flip":
        wrapped[20] ^= 0x01
    elif mutation == "short":
        del wrapped[-1]
    else:
        wrapped[0] = 2
    with pytest.raises(KeyUnavailable):
        provider.unwrap(bytes(wrapped), context=CTX)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_file_readable_by_others_is_refused(provider: LocalKeyFileProvider, mode: int) -> None:
    os.chmod(provider.path, mode)
    with pytest.raises(KeyUnavailable, match=f"mode {mode:04o}.*chmod 600"):
        LocalKeyFileProvider(provider.path)


def test_missing_or_bad_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyUnavailable, match="does not exist"):
        LocalKeyFileProvider(tmp_path / "absent.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    with pytest.raises(KeyUnavailable, match="exactly 32 bytes"):
        LocalKeyFileProvider(short)
    with pytest.raises(KeyUnavailable, match="not a regular file"):
        LocalKeyFileProvider(tmp_path)


def test_data_keys(provider: LocalKeyFileProvider) -> None:
    keys = {new_data_key() for _ in range(100)}
    assert len(keys) == 100 and all(len(k) == 32 for k in keys)
    with pytest.raises(ValueError, match="32 bytes"):
        provider.wrap(b"short", context=CTX)


def test_a_key_appears_whole_or_not_at_all(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write leaves neither the key nor its temporary file; another process
    listing the directory (the keyring matches ``master-NNNN.key``) never sees a partial
    key, because the file is complete before it gets its name."""
    from sandbox.datasets.keyring import LocalKeyring

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        LocalKeyFileProvider.create(tmp_path / "master-0001.key")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    seen_while_writing: list[list[str]] = []
    real_write = os.write

    def spying_write(fd: int, data: bytes) -> int:
        seen_while_writing.append(LocalKeyring(tmp_path).key_ids())
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spying_write)
    provider = LocalKeyFileProvider.create(tmp_path / "master-0001.key")
    assert seen_while_writing == [[]]  # the keyring saw no key while it was written
    assert [p.name for p in tmp_path.iterdir()] == ["master-0001.key"]
    assert LocalKeyring(tmp_path).key_ids() == [provider.key_id]


def test_keyring_takes_the_next_generation_when_another_process_took_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.datasets.keyring import LocalKeyring

    ring = LocalKeyring.create(tmp_path)
    real = LocalKeyring._files
    calls = [0]

    def stale(self: LocalKeyring) -> list[tuple[int, Path]]:  # listed before the other wrote
        calls[0] += 1
        files = real(self)
        if calls[0] == 1:
            LocalKeyFileProvider.create(tmp_path / "master-0002.key")  # the other process
        return files

    monkeypatch.setattr(LocalKeyring, "_files", stale)
    new = ring.create_next()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "master-0001.key", "master-0002.key", "master-0003.key"]
    assert ring.current().key_id == new.key_id


def test_retired_and_abandoned_keys_are_destroyed(tmp_path: Path) -> None:
    import time

    from sandbox.datasets.keyring import LocalKeyring

    ring = LocalKeyring.create(tmp_path)
    first = ring.current().key_id
    ring.create_next()
    ring.retire(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master-0002.key"]
    # what a process that died mid-way leaves behind
    (tmp_path / ".master-0002.key.retired").write_bytes(b"k" * 32)
    old = tmp_path / ".master-0003.key.0123.partial"
    old.write_bytes(b"p" * 32)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    young = tmp_path / ".master-0003.key.4567.partial"  # maybe being written right now
    young.write_bytes(b"q" * 32)
    ring.create_next()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".master-0003.key.4567.partial", "master-0002.key", "master-0003.key"]
