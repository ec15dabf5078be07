"""Tests for sandbox.datasets.store: round trip, tamper detection, no plaintext on disk."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sandbox.datasets import store
from sandbox.datasets.generator import generate_enterprises
from sandbox.datasets.keys import new_data_key
from sandbox.datasets.store import (
    IntegrityError,
    decrypt_to_bytes,
    encrypt_table,
    load_table,
)

CHUNK = 4096  # small chunks so a small table spans several


@pytest.fixture
def table() -> pa.Table:
    return generate_enterprises(2000, seed=11)


@pytest.fixture
def key() -> bytes:
    return new_data_key()


def layout(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte ranges of each chunk record (nonce | ciphertext | tag)."""
    raw = path.read_bytes()
    (hlen,) = struct.unpack(">I", raw[8:12])
    header = json.loads(raw[12 : 12 + hlen])
    pos, out = 12 + hlen, []
    for i in range(header["chunk_count"]):
        n = min(header["chunk_size"], header["plaintext_bytes"] - i * header["chunk_size"])
        out.append((pos, pos + 12 + n + 16))
        pos += 12 + n + 16
    assert pos == len(raw)
    return out


def write(table: pa.Table, path: Path, key: bytes, dataset_id: str = "ds1", version: int = 1):
    return encrypt_table(table, path, key, dataset_id=dataset_id, version=version, chunk_size=CHUNK)


def ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_round_trip(table: pa.Table, key: bytes, tmp_path: Path) -> None:
    path = tmp_path / "d.sbxenc"
    info = write(table, path, key)
    assert info.path == path
    assert info.chunk_count == len(layout(path)) > 3
    assert info.plaintext_bytes == len(ipc_bytes(table))
    assert info.ciphertext_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["d.sbxenc"]  # no temp file left behind
    buf = decrypt_to_bytes(path, key, dataset_id="ds1", version=1)
    assert isinstance(buf, bytearray) and bytes(buf) == ipc_bytes(table)
    assert load_table(path, key, dataset_id="ds1", version=1).equals(table)


def test_plaintext_is_an_ipc_file_polars_can_scan(
    table: pa.Table, key: bytes, tmp_path: Path
) -> None:
    """The broker writes the decrypted buffer to a 0600 file in RAM and scans it."""
    path = tmp_path / "d.sbxenc"
    write(table, path, key)
    plain = tmp_path / "data.arrow"
    plain.write_bytes(decrypt_to_bytes(path, key, dataset_id="ds1", version=1))
    frame = pl.scan_ipc(plain).select("city", "employees").collect()
    assert frame.height == table.num_rows
    assert frame["employees"].sum() == pc.sum(table.column("employees")).as_py()


def test_default_chunking_and_empty_table(key: bytes, tmp_path: Path) -> None:
    empty = generate_enterprises(1, seed=1).slice(0, 0)
    info = encrypt_table(empty, tmp_path / "e", key, dataset_id="ds", version=0)
    assert info.chunk_count == 1
    assert load_table(tmp_path / "e", key, dataset_id="ds", version=0).equals(empty)


def test_no_plaintext_in_stored_file(table: pa.Table, key: bytes, tmp_path: Path) -> None:
    path = tmp_path / "d.sbxenc"
    write(table, path, key)
    raw = path.read_bytes()
    row = table.slice(7, 1).to_pylist()[0]
    needles = [
        row["enterprise_id"].encode(),
        b"Nanjing",
        b"Suzhou",
        b"manufacturing",
        b"annual_revenue",
        struct.pack("<d", row["annual_revenue"]),
        struct.pack("<d", row["tax_paid"]),
    ]
    for needle in needles:
        assert needle not in raw, needle
    assert row["enterprise_id"].encode() in ipc_bytes(table)  # the needles are real plaintext


def expect_integrity_error(path: Path, key: bytes, dataset_id: str = "ds1", version: int = 1):
    with pytest.raises(IntegrityError) as info:
        load_table(path, key, dataset_id=dataset_id, version=version)
    message = str(info.value)
    assert f"dataset {dataset_id!r} version {version}" in message
    assert "Nanjing" not in message and "Suzhou" not in message
    return message


@pytest.mark.parametrize("where", ["magic", "header", "nonce", "ciphertext", "tag", "last"])
def test_bit_flip_is_detected(table: pa.Table, key: bytes, tmp_path: Path, where: str) -> None:
    path = tmp_path / "d.sbxenc"
    write(table, path, key)
    chunks = layout(path)
    offset = {
        "magic": 3,
        "header": 20,
        "nonce": chunks[1][0] + 2,
        "ciphertext": chunks[1][0] + 100,
        "tag": chunks[1][1] - 1,
        "last": chunks[-1][1] - 20,
    }[where]
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x04
    path.write_bytes(raw)
    expect_integrity_error(path, key)


def test_chunks_swapped_between_files_are_detected(
    table: pa.Table, key: bytes, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(table, a, key)
    write(table, b, key)  # same key, dataset, version and size: only the file id differs
    raw_a, raw_b = bytearray(a.read_bytes()), b.read_bytes()
    start, end = layout(a)[1]
    raw_a[start:end] = raw_b[start:end]
    a.write_bytes(raw_a)
    assert "chunk 1 of" in expect_integrity_error(a, key)


def test_reordered_chunks_are_detected(table: pa.Table, key: bytes, tmp_path: Path) -> None:
    path = tmp_path / "d"
    write(table, path, key)
    raw = path.read_bytes()
    (s0, e0), (s1, e1) = layout(path)[:2]
    path.write_bytes(raw[:s0] + raw[s1:e1] + raw[s0:e0] + raw[e1:])
    assert "chunk 0 of" in expect_integrity_error(path, key)


@pytest.mark.parametrize("cut", ["last_chunk", "mid_chunk", "header", "empty", "append"])
def test_truncated_or_extended_file_is_detected(
    table: pa.Table, key: bytes, tmp_path: Path, cut: str
) -> None:
    path = tmp_path / "d"
    write(table, path, key)
    raw = path.read_bytes()
    chunks = layout(path)
    new = {
        "last_chunk": raw[: chunks[-1][0]],
        "mid_chunk": raw[: chunks[2][0] + 50],
        "header": raw[:15],
        "empty": b"",
        "append": raw + b"\0" * 28,
    }[cut]
    path.write_bytes(new)
    message = expect_integrity_error(path, key)
    assert any(word in message for word in ("truncated", "trailing", "bad magic"))


def test_dropped_last_chunk_with_fixed_header_is_detected(
    table: pa.Table, key: bytes, tmp_path: Path
) -> None:
    """An attacker who also rewrites the header to match the shorter file still fails."""
    path = tmp_path / "d"
    write(table, path, key)
    raw = path.read_bytes()
    (hlen,) = struct.unpack(">I", raw[8:12])
    header = json.loads(raw[12 : 12 + hlen])
    chunks = layout(path)
    header["chunk_count"] -= 1
    header["plaintext_bytes"] = header["chunk_count"] * header["chunk_size"]
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(
        raw[:8] + struct.pack(">I", len(body)) + body + raw[chunks[0][0] : chunks[-1][0]]
    )
    assert "failed authentication" in expect_integrity_error(path, key)


def test_wrong_dataset_version_or_key(table: pa.Table, key: bytes, tmp_path: Path) -> None:
    path = tmp_path / "d"
    write(table, path, key, dataset_id="ds1", version=3)
    assert "belongs to dataset 'ds1' version 3" in expect_integrity_error(path, key, "ds2", 3)
    expect_integrity_error(path, key, "ds1", 4)
    assert "failed authentication" in expect_integrity_error(path, new_data_key(), "ds1", 3)


def test_failed_write_leaves_nothing(
    table: pa.Table, key: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d"
    write(table, path, key)
    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write(table.slice(0, 10), path, key)
    assert os.listdir(tmp_path) == ["d"]
    assert path.read_bytes() == before


def test_bad_arguments(table: pa.Table, key: bytes, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encrypt_table(table, tmp_path / "x", b"k" * 16, dataset_id="d", version=1)
    with pytest.raises(ValueError, match="version"):
        encrypt_table(table, tmp_path / "x", key, dataset_id="d", version=True)
    with pytest.raises(ValueError, match="dataset_id"):
        encrypt_table(table, tmp_path / "x", key, dataset_id="", version=1)
    assert not (tmp_path / "x").exists()


def test_million_rows_load_fast(big_table: tuple[pa.Table, float], tmp_path: Path) -> None:
    table, _ = big_table
    key = new_data_key()
    path = tmp_path / "big"
    encrypt_table(table, path, key, dataset_id="enterprises", version=1)
    start = time.perf_counter()
    loaded = load_table(path, key, dataset_id="enterprises", version=1)
    elapsed = time.perf_counter() - start
    assert loaded.num_rows == table.num_rows
    assert elapsed < 1.0, f"load took {elapsed:.2f} s"
