"""The encrypted upload spool: random-access decrypting reads, tamper detection, ingest
through it, cleanup, and reaping the spools of dead processes."""

from __future__ import annotations

import io
import os
import random
import time
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from sandbox.datasets.generator import enterprise_schema, generate_enterprises
from sandbox.datasets.ingest import read_validated
from sandbox.datasets.spool import (
    SPOOL_MAGIC,
    SpoolFile,
    SpoolIntegrityError,
    UploadSpool,
    open_plaintext,
    reap_stale_uploads,
)


def _spooled(spool: UploadSpool, data: bytes, piece: int = 333) -> SpoolFile:
    writer = spool.create()
    for i in range(0, len(data), piece):
        writer.write(data[i:i + piece])
    return writer.finish()


def test_random_access_reads_return_the_plaintext(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(5 * 1000 + 17)
    rng = random.Random(2)
    with UploadSpool(tmp_path / "spool", chunk_size=1000) as spool:
        file = _spooled(spool, data)
        with file.open() as reader:
            assert reader.read() == data
            assert reader.seek(0, io.SEEK_END) == len(data)
            for _ in range(3000):
                start, n = rng.randrange(len(data) + 10), rng.randrange(3500)
                reader.seek(start)
                assert reader.read(n) == data[start:start + n], (start, n)
            reader.seek(-10, io.SEEK_END)
            assert reader.read() == data[-10:]
            assert not reader.writable()


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 2000, 2001])
def test_sizes_at_and_around_chunk_boundaries(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    with UploadSpool(tmp_path / "spool", chunk_size=1000) as spool:
        file = _spooled(spool, data, piece=1000)
        assert file.size == size
        with file.open() as reader:
            assert reader.read() == data


def test_on_disk_it_is_ciphertext_in_private_files(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    data = b"enterprise_id,city,secret\n" + b"42,Nanjing,very secret value\n" * 2000
    with UploadSpool(root, chunk_size=4096) as spool:
        file = _spooled(spool, data)
        raw = file.path.read_bytes()
        assert raw.startswith(SPOOL_MAGIC)
        assert b"secret" not in raw and b"Nanjing" not in raw
        assert spool.key() not in raw
        assert oct(root.stat().st_mode & 0o777) == "0o700"
        assert oct(spool.directory.stat().st_mode & 0o777) == "0o700"
        assert oct(file.path.stat().st_mode & 0o777) == "0o600"
        assert spool.key().hex() not in repr(spool) + repr(file)
    assert list(root.iterdir()) == []  # closing removed everything
    with pytest.raises(ValueError, match="closed"):
        spool.key()


def _tamper(path: Path, change) -> None:
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(change(raw)))


@pytest.mark.parametrize("name, change, message", [
    ("bit flip", lambda r: r[:-100] + bytes([r[-100] ^ 1]) + r[-99:],
     "chunk 2 of 3 failed authentication"),
    ("header", lambda r: r.replace(b"upload-spool", b"upload-sp00l"), "header changed"),
    ("truncated", lambda r: r[:-1], "not the"),
    ("extended", lambda r: r + b"\0", "not the"),
    ("reordered", lambda r: _swap_records(r), "chunk 0 of 3 failed authentication"),
])
def test_tampering_fails_loudly_naming_the_chunk(tmp_path: Path, name: str, change,
                                                 message: str) -> None:
    data = os.urandom(2500)
    with UploadSpool(tmp_path / "spool", chunk_size=1000) as spool:
        file = _spooled(spool, data)
        _tamper(file.path, change)
        with pytest.raises(SpoolIntegrityError, match=message) as info, file.open() as reader:
            reader.read()
        assert "modified on disk" in str(info.value)


def _swap_records(raw: bytearray) -> bytearray:
    record = 12 + 1000 + 16
    start = len(raw) - (2 * record + 12 + 500 + 16)  # after the prefix
    first, second = raw[start:start + record], raw[start + record:start + 2 * record]
    return raw[:start] + second + first + raw[start + 2 * record:]


def test_a_record_from_another_spool_fails(tmp_path: Path) -> None:
    data = os.urandom(2500)
    with UploadSpool(tmp_path / "a", chunk_size=1000) as one, \
            UploadSpool(tmp_path / "b", chunk_size=1000) as other:
        mine, theirs = _spooled(one, data), _spooled(other, data)
        foreign = theirs.path.read_bytes()
        mine.path.write_bytes(mine.path.read_bytes()[:len(mine.prefix)]
                              + foreign[len(theirs.prefix):])
        with pytest.raises(SpoolIntegrityError, match="chunk 0 of 3"), mine.open() as reader:
            reader.read()


def test_ingest_reads_csv_and_parquet_through_the_spool(tmp_path: Path) -> None:
    table = generate_enterprises(30_000, seed=3)
    schema = enterprise_schema(30_000)
    plain_csv, plain_parquet = tmp_path / "d.csv", tmp_path / "d.parquet"
    pcsv.write_csv(table, plain_csv)
    pq.write_table(table, plain_parquet, row_group_size=7000)
    with UploadSpool(tmp_path / "spool", chunk_size=64 * 1024) as spool:
        for plain, suffix in ((plain_csv, ".csv"), (plain_parquet, ".parquet")):
            path = _spooled(spool, plain.read_bytes(), piece=50_000).with_suffix(suffix)
            assert path.suffix == suffix and path.parent == spool.directory
            assert read_validated(path, schema).equals(read_validated(plain, schema))
            assert open_plaintext(path) is not None
    assert open_plaintext(path) is None  # the spool is closed: an ordinary (gone) path


def test_tampered_spool_is_not_ingested(tmp_path: Path) -> None:
    table = generate_enterprises(20_000, seed=4)
    plain = tmp_path / "d.parquet"
    pq.write_table(table, plain)
    with UploadSpool(tmp_path / "spool", chunk_size=64 * 1024) as spool:
        path = _spooled(spool, plain.read_bytes(), 10_000).with_suffix(".parquet")
        _tamper(path, lambda r: r[:-2000] + bytes([r[-2000] ^ 4]) + r[-1999:])  # the footer
        with pytest.raises(SpoolIntegrityError, match="failed authentication"):
            read_validated(path, enterprise_schema(20_000))


def test_closing_aborts_an_unfinished_file(tmp_path: Path) -> None:
    with UploadSpool(tmp_path / "spool", chunk_size=1000) as spool:
        writer = spool.create()
        writer.write(os.urandom(5000))
        assert writer.path.exists()
    assert not writer.path.exists() and not spool.directory.exists()


def test_reaping_removes_unlocked_spools_and_keeps_open_ones(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    crashed = root / f"sbx-upload-{pid_max + 1}-abcdefgh"  # its process is gone
    reused = root / f"sbx-upload-{os.getpid()}-abcdefgh"  # a restart reused the pid
    old_tmpfs = root / "sbx-upload-abc123_x"  # an earlier version's plaintext spool
    fresh_tmpfs = root / "sbx-upload-zzz999_y"
    other = root / "unrelated"
    for directory in (crashed, reused, old_tmpfs, fresh_tmpfs, other):
        directory.mkdir(parents=True)
        (directory / "part-1").write_bytes(b"x")
    hour_ago = time.time() - 7200
    os.utime(old_tmpfs, (hour_ago, hour_ago))
    with UploadSpool(root) as live:
        file = _spooled(live, b"still uploading")
        os.utime(live.directory, (hour_ago, hour_ago))  # a long upload stays too
        assert reap_stale_uploads(root) == 3
        assert sorted(p.name for p in root.iterdir()) == sorted(
            [live.directory.name, fresh_tmpfs.name, other.name])
        with file.open() as reader:
            assert reader.read() == b"still uploading"
    assert reap_stale_uploads(tmp_path / "missing") == 0
