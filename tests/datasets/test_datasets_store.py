"""Tests for sandbox.datasets.store (format 2): streaming zstd Parquet in STREAM-sealed
AES-256-GCM chunks. Round trip, tamper detection, atomic writes, no plaintext on disk."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sandbox.datasets import store
from sandbox.datasets.generator import generate_enterprises
from sandbox.datasets.keys import new_data_key
from sandbox.datasets.store import (
    IntegrityError,
    decrypt_to_bytes,
    encrypt_table,
    load_table,
    write_encrypted_parquet,
)

CHUNK = 4096  # small chunks so a small table spans several


@pytest.fixture
def table() -> pa.Table:
    return generate_enterprises(2000, seed=11)


@pytest.fixture
def key() -> bytes:
    return new_data_key()


def header_of(raw: bytes) -> tuple[dict[str, object], int]:
    (hlen,) = struct.unpack(">I", raw[8:12])
    return json.loads(raw[12 : 12 + hlen]), 12 + hlen


def layout(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte ranges of each record (nonce | ciphertext | tag): full chunks,
    then one final chunk of 0..chunk_size plaintext bytes."""
    raw = path.read_bytes()
    header, pos = header_of(raw)
    size = int(header["chunk_size"]) + 28  # type: ignore[call-overload]
    full, rest = divmod(len(raw) - pos, size)
    sizes = [size] * full + ([rest] if rest else [])
    out = []
    for n in sizes:
        out.append((pos, pos + n))
        pos += n
    return out


def write(table: pa.Table, path: Path, key: bytes, dataset_id: str = "ds1", version: int = 1):
    return encrypt_table(table, path, key, dataset_id=dataset_id, version=version, chunk_size=CHUNK)


def test_round_trip(table: pa.Table, key: bytes, tmp_path: Path) -> None:
    path = tmp_path / "d.sbxenc"
    info = write(table, path, key)
    assert info.path == path
    assert info.row_count == table.num_rows
    assert info.chunk_count == len(layout(path)) > 3
    assert info.ciphertext_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["d.sbxenc"]  # no temp file left behind
    header, _ = header_of(path.read_bytes())
    assert header["format"] == 2 and header["payload"] == "parquet-zstd"
    assert header["dataset_id"] == "ds1" and header["version"] == 1
    buf = decrypt_to_bytes(path, key, dataset_id="ds1", version=1)
    assert isinstance(buf, bytearray) and len(buf) == info.plaintext_bytes
    assert buf[:4] == b"PAR1" and buf[-4:] == b"PAR1"
    meta = pq.ParquetFile(pa.BufferReader(bytes(buf))).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert load_table(path, key, dataset_id="ds1", version=1).equals(table)


def test_plaintext_is_a_parquet_file_polars_can_scan(
    table: pa.Table, key: bytes, tmp_path: Path
) -> None:
    """The broker writes the decrypted buffer to a 0600 file in RAM and scans it."""
    path = tmp_path / "d.sbxenc"
    write(table, path, key)
    plain = tmp_path / "data.parquet"
    plain.write_bytes(decrypt_to_bytes(path, key, dataset_id="ds1", version=1))
    frame = pl.scan_parquet(plain).select("city", "employees").collect()
    assert frame.height == table.num_rows
    assert frame["employees"].sum() == pc.sum(table.column("employees")).as_py()


def test_streaming_batches_are_regrouped_into_row_groups(key: bytes, tmp_path: Path) -> None:
    table = generate_enterprises(2500, seed=5)
    seen: list[int] = []

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in table.to_batches(max_chunksize=70):
            seen.append(batch.num_rows)
            yield batch

    path = tmp_path / "d"
    info = write_encrypted_parquet(
        batches(), table.schema, path, key, dataset_id="ds", version=2, row_group_rows=1000
    )
    assert info.row_count == 2500 and sum(seen) == 2500
    buf = decrypt_to_bytes(path, key, dataset_id="ds", version=2)
    meta = pq.ParquetFile(pa.BufferReader(bytes(buf))).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1000, 1000, 500]
    assert load_table(path, key, dataset_id="ds", version=2).equals(table)


def test_empty_table_and_exact_multiple_of_chunk_size(key: bytes, tmp_path: Path) -> None:
    empty = generate_enterprises(1, seed=1).slice(0, 0)
    info = encrypt_table(empty, tmp_path / "e", key, dataset_id="ds", version=0)
    assert info.chunk_count == 1 and info.row_count == 0
    assert load_table(tmp_path / "e", key, dataset_id="ds", version=0).equals(empty)
    # The Parquet bytes are deterministic, so pick a chunk size that divides them: the
    # payload is then full chunks plus an EMPTY final chunk, which must still be there.
    table = generate_enterprises(300, seed=2)
    size = encrypt_table(table, tmp_path / "a", key, dataset_id="ds", version=1).plaintext_bytes
    info = encrypt_table(table, tmp_path / "b", key, dataset_id="ds", version=1, chunk_size=size)
    assert info.plaintext_bytes == size and info.chunk_count == 2
    records = layout(tmp_path / "b")
    assert records[-1][1] - records[-1][0] == 28  # nonce + tag, no ciphertext
    assert load_table(tmp_path / "b", key, dataset_id="ds", version=1).equals(table)
    raw = (tmp_path / "b").read_bytes()
    (tmp_path / "b").write_bytes(raw[: records[-1][0]])  # drop the empty final chunk
    assert "failed authentication" in expect_integrity_error(tmp_path / "b", key, "ds", 1)


def test_no_plaintext_in_stored_file(table: pa.Table, key: bytes, tmp_path: Path) -> None:
    path = tmp_path / "d.sbxenc"
    write(table, path, key)
    raw = path.read_bytes()
    ids = sorted(table.column("enterprise_id").to_pylist())
    cities = sorted(table.column("city").to_pylist())
    # Column names and min/max statistics sit uncompressed in the Parquet footer.
    needles = [b"annual_revenue", b"enterprise_id", ids[0].encode(), ids[-1].encode()]
    needles += [cities[0].encode(), cities[-1].encode(), b"PAR1", b"ARROW:schema"]
    plain = bytes(decrypt_to_bytes(path, key, dataset_id="ds1", version=1))
    for needle in needles:
        assert needle in plain, needle  # the needles are real plaintext ...
        assert needle not in raw, needle  # ... and none reaches the disk


def expect_integrity_error(path: Path, key: bytes, dataset_id: str = "ds1", version: int = 1):
    with pytest.raises(IntegrityError) as info:
        load_table(path, key, dataset_id=dataset_id, version=version)
    message = str(info.value)
    assert f"dataset {dataset_id!r} version {version}" in message
    assert "Nanjing" not in message and "Suzhou" not in message
    return message


@pytest.mark.parametrize("where", ["magic", "header", "nonce", "ciphertext", "tag", "final"])
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
        "final": chunks[-1][1] - 20,
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
    write(table, b, key)  # same key, dataset, version and plaintext: only the file id differs
    raw_a, raw_b = bytearray(a.read_bytes()), b.read_bytes()
    assert len(raw_a) == len(raw_b)
    start, end = layout(a)[1]
    raw_a[start:end] = raw_b[start:end]
    a.write_bytes(raw_a)
    assert "chunk 1 of" in expect_integrity_error(a, key)


def test_header_swapped_between_files_is_detected(
    table: pa.Table, key: bytes, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write(table, a, key)
    write(table, b, key)
    first = layout(a)[0][0]
    a.write_bytes(b.read_bytes()[:first] + a.read_bytes()[first:])
    assert "chunk 0 of" in expect_integrity_error(a, key)


@pytest.mark.parametrize("swap", [(0, 1), (2, 3), (-2, -1)])
def test_reordered_chunks_are_detected(
    table: pa.Table, key: bytes, tmp_path: Path, swap: tuple[int, int]
) -> None:
    path = tmp_path / "d"
    write(table, path, key)
    raw = path.read_bytes()
    chunks = layout(path)
    (s0, e0), (s1, e1) = chunks[swap[0]], chunks[swap[1]]
    new = raw[:s0] + raw[s1:e1] + raw[s0:e0] + raw[e1:]
    assert len(new) == len(raw) or swap == (-2, -1)
    path.write_bytes(new)
    expect_integrity_error(path, key)


@pytest.mark.parametrize(
    "cut", ["final_chunk", "two_chunks", "middle_chunk", "mid_chunk", "header", "empty", "append"]
)
def test_truncated_or_extended_file_is_detected(
    table: pa.Table, key: bytes, tmp_path: Path, cut: str
) -> None:
    path = tmp_path / "d"
    write(table, path, key)
    raw = path.read_bytes()
    chunks = layout(path)
    new = {
        "final_chunk": raw[: chunks[-1][0]],  # at a chunk boundary
        "two_chunks": raw[: chunks[-2][0]],
        "middle_chunk": raw[: chunks[2][0]] + raw[chunks[3][0] :],
        "mid_chunk": raw[: chunks[2][0] + 50],
        "header": raw[:15],
        "empty": b"",
        "append": raw + b"\0" * 40,
    }[cut]
    path.write_bytes(new)
    message = expect_integrity_error(path, key)
    assert any(w in message for w in ("failed authentication", "truncated", "bad magic")), message


def test_wrong_dataset_version_or_key(table: pa.Table, key: bytes, tmp_path: Path) -> None:
    path = tmp_path / "d"
    write(table, path, key, dataset_id="ds1", version=3)
    assert "belongs to dataset 'ds1' version 3" in expect_integrity_error(path, key, "ds2", 3)
    assert "belongs to dataset 'ds1' version 3" in expect_integrity_error(path, key, "ds1", 4)
    assert "failed authentication" in expect_integrity_error(path, new_data_key(), "ds1", 3)


def test_header_rewritten_to_another_dataset_fails(
    table: pa.Table, key: bytes, tmp_path: Path
) -> None:
    """Moving a file to another dataset version by editing its header breaks every chunk."""
    path = tmp_path / "d"
    write(table, path, key, dataset_id="ds1", version=3)
    raw = path.read_bytes()
    header, pos = header_of(raw)
    header["dataset_id"], header["version"] = "ds2", 4
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(raw[:8] + struct.pack(">I", len(body)) + body + raw[pos:])
    assert "chunk 0 of" in expect_integrity_error(path, key, "ds2", 4)


def test_failed_decryption_zeroes_the_buffer(
    table: pa.Table, key: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d"
    write(table, path, key)
    raw = bytearray(path.read_bytes())
    raw[layout(path)[-1][1] - 1] ^= 1  # the final chunk fails, after the others decrypted
    path.write_bytes(raw)
    buffers: list[bytearray] = []
    real = store.decrypt_records

    def spy(fh: object, aead: object, digest: bytes, out: bytearray, *args: object,
            **kwargs: object) -> None:
        buffers.append(out)
        real(fh, aead, digest, out, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "decrypt_records", spy)
    expect_integrity_error(path, key)
    assert len(buffers[0]) > CHUNK and not any(buffers[0])


def test_load_table_zeroes_the_decrypted_buffer(
    table: pa.Table, key: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d"
    write(table, path, key)
    buffers: list[bytearray] = []
    real = store.decrypt_to_bytes

    def spy(*args: object, **kwargs: object) -> bytearray:
        buffers.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return buffers[-1]

    monkeypatch.setattr(store, "decrypt_to_bytes", spy)
    loaded = load_table(path, key, dataset_id="ds1", version=1)
    assert not any(buffers[0])
    assert loaded.equals(table)  # the table does not alias the wiped buffer


def test_failed_rename_leaves_nothing(
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


@pytest.mark.parametrize("after", [0, 3])
def test_iterator_failure_leaves_nothing(
    table: pa.Table, key: bytes, tmp_path: Path, after: int
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = out / "d"
    write(table, path, key)
    before = path.read_bytes()

    def batches() -> Iterator[pa.RecordBatch]:
        yield from table.to_batches(max_chunksize=100)[:after]
        raise ValueError("row 999: bad value")

    with pytest.raises(ValueError, match="row 999"):
        write_encrypted_parquet(
            batches(), table.schema, path, key, dataset_id="ds1", version=1, row_group_rows=150
        )
    assert os.listdir(out) == ["d"]
    assert path.read_bytes() == before


def test_batch_with_wrong_schema_is_refused(table: pa.Table, key: bytes, tmp_path: Path) -> None:
    other = table.drop_columns(["tax_paid"])
    with pytest.raises(ValueError):
        write_encrypted_parquet(
            other.to_batches(), table.schema, tmp_path / "d", key, dataset_id="x", version=1
        )
    assert os.listdir(tmp_path) == []


def test_bad_arguments(table: pa.Table, key: bytes, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encrypt_table(table, tmp_path / "x", b"k" * 16, dataset_id="d", version=1)
    with pytest.raises(ValueError, match="version"):
        encrypt_table(table, tmp_path / "x", key, dataset_id="d", version=True)
    with pytest.raises(ValueError, match="dataset_id"):
        encrypt_table(table, tmp_path / "x", key, dataset_id="", version=1)
    with pytest.raises(ValueError, match="chunk_size"):
        encrypt_table(table, tmp_path / "x", key, dataset_id="d", version=1, chunk_size=0)
    with pytest.raises(ValueError, match="32 bytes"):
        decrypt_to_bytes(tmp_path / "x", b"k", dataset_id="d", version=1)
    assert os.listdir(tmp_path) == []


def test_million_rows_load_fast(big_table: tuple[pa.Table, float], tmp_path: Path) -> None:
    table, _ = big_table
    key = new_data_key()
    path = tmp_path / "big"
    start = time.perf_counter()
    info = encrypt_table(table, path, key, dataset_id="enterprises", version=1)
    written = time.perf_counter() - start
    start = time.perf_counter()
    buf = decrypt_to_bytes(path, key, dataset_id="enterprises", version=1)
    decrypted = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load_table(path, key, dataset_id="enterprises", version=1)
    elapsed = time.perf_counter() - start
    assert len(buf) == info.plaintext_bytes
    assert loaded.num_rows == table.num_rows
    assert written < 3.0, f"write took {written:.2f} s"
    assert decrypted < 0.2, f"decrypting {len(buf) / 1e6:.0f} MB took {decrypted:.3f} s"
    assert elapsed < 1.0, f"load took {elapsed:.2f} s"


def test_the_first_bad_chunk_is_named_whichever_thread_finds_one_first(
    table: pa.Table, key: bytes, tmp_path: Path
) -> None:
    """Chunks are decrypted on two threads; the error still names the lowest bad chunk
    (a later bad chunk may fail first on the other thread)."""
    path = tmp_path / "d"
    write(table, path, key)
    spans = layout(path)
    assert len(spans) >= 6
    raw = bytearray(path.read_bytes())
    for chunk in (2, 3, 5):
        raw[spans[chunk][0] + 40] ^= 0x01  # a ciphertext byte of each of three chunks
    path.write_bytes(bytes(raw))
    for _ in range(20):
        assert "chunk 2 of" in expect_integrity_error(path, key)
