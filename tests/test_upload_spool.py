"""Uploads are spooled encrypted on disk: ciphertext while the upload runs, tampering
caught at ingest, stale spools reaped at start, and memory flat for a large upload."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import polars as pl
import pyarrow.csv as pcsv
import pytest
from conftest import Api
from sqlalchemy import func, select
from test_upload_limits import BOUNDARY, TAIL, _head, _post, _small_filesystem, _spools

from sandbox.api.app import create_app
from sandbox.cli.home import initialise
from sandbox.config import Settings
from sandbox.datasets.generator import enterprise_schema, generate_enterprises
from sandbox.db.models import DatasetVersion


@pytest.fixture(scope="module")
def csv_and_schema(demo_files: tuple[Path, Path]) -> tuple[bytes, bytes]:
    data, schema = demo_files
    return pl.read_parquet(data).write_csv().encode(), schema.read_bytes()


NEXT_PART = f"\r\n--{BOUNDARY}\r\n".encode()
FORMAT_PART = b'Content-Disposition: form-data; name="format"\r\n\r\ncsv'


def test_the_spool_holds_ciphertext_only(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    seen: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        yield _head(schema, "data") + csv + NEXT_PART  # the data part is complete
        await asyncio.sleep(0)
        seen.extend(p.read_bytes() for p in _spools(api))
        yield FORMAT_PART + TAIL

    response = asyncio.run(_post(api, body()))
    assert response.status_code == 201, response.text
    assert len(seen) == 1 and len(seen[0]) > len(csv)
    header_line = csv.split(b"\n", 1)[0]
    assert header_line not in seen[0] and csv[5000:5032] not in seen[0]
    assert _spools(api) == []


def test_a_spool_changed_on_disk_is_refused_loudly(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema

    async def body() -> AsyncIterator[bytes]:
        yield _head(schema, "data") + csv + NEXT_PART
        await asyncio.sleep(0)
        [spooled] = _spools(api)
        raw = bytearray(spooled.read_bytes())
        raw[1000] ^= 0x10  # inside the first record
        spooled.write_bytes(bytes(raw))
        yield FORMAT_PART + TAIL

    response = asyncio.run(_post(api, body()))
    assert response.status_code == 500, response.text
    detail = response.json()["detail"]
    assert "failed the integrity check: chunk 0 of 2 failed authentication" in detail
    assert "nothing was stored" in detail
    with api.home.runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(DatasetVersion)) == 0
    assert list(api.home.settings.data_dir.iterdir()) == [] and _spools(api) == []


def test_stale_spools_are_reaped_at_start(api: Api) -> None:
    root = api.home.settings.effective_upload_spool_dir
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    stale = root / f"sbx-upload-{dead_pid}-abcdefgh"
    stale.mkdir(parents=True)
    (stale / "part-1.csv").write_bytes(b"SBXSPL1\n...")
    create_app(api.home.runtime)  # an API process starting
    assert not stale.exists()


# -- memory ----------------------------------------------------------------------------

_SERVER = textwrap.dedent("""
    import sys, uvicorn
    from sandbox.api.app import create_app
    from sandbox.config import Settings
    from sandbox.runtime import Runtime
    uvicorn.run(create_app(Runtime.open(Settings())), host="127.0.0.1", port=int(sys.argv[1]),
                log_level="warning")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:"))) * 1024


@contextlib.contextmanager
def _serve(env: dict[str, str]) -> Iterator[tuple[str, int]]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        server.terminate()
        server.wait(30)


def _upload(url: str, token: str, schema: Path, data: Path) -> httpx.Response:
    with open(data, "rb") as handle:  # httpx streams the file part from disk
        return httpx.post(f"{url}/v1/datasets", headers={"Authorization": f"Bearer {token}"},
                          data={"schema": schema.read_text()},
                          files={"data": (data.name, handle)}, timeout=300)


def test_large_upload_keeps_memory_flat_and_needs_no_ram_disk(tmp_path: Path) -> None:
    """A ~150 MB CSV goes through a real server whose tmpfs is capped at 32 MiB (when we
    may mount one). Receiving and spooling it grows the server's peak RSS by a few MB
    (measured alone: a schema of another organisation is refused only after the whole
    upload is spooled); the whole registration stays within the ingest's own budget, about
    one 1M-row row group (171 MB measured registering the plaintext file directly)."""
    n = 2_500_000
    big, small = tmp_path / "big.csv", tmp_path / "small.csv"
    pcsv.write_csv(generate_enterprises(n, seed=9), big)
    pcsv.write_csv(generate_enterprises(50_000, seed=9), small)
    size = big.stat().st_size
    assert size > 140_000_000
    schema, foreign = tmp_path / "schema.yaml", tmp_path / "foreign.yaml"
    schema.write_text(enterprise_schema(n).to_yaml())
    foreign.write_text(schema.read_text().replace("owner_organisation: jiangsu-data-bureau",
                                                  "owner_organisation: someone-else"))
    home = tmp_path / "home"
    tmpfs = Path("/dev/shm")
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(pytest.skip.Exception):  # no root: /dev/shm, uncapped
            tmpfs = stack.enter_context(_small_filesystem(tmp_path / "ram", "32m"))
        env = {**os.environ, "SANDBOX_HOME": str(home), "SANDBOX_TMPFS_DIR": str(tmpfs)}
        token = initialise(Settings(home=home, tmpfs_dir=tmpfs)).tokens["owner"]
        with _serve(env) as (url, pid):
            warm = _upload(url, token, schema, small)  # thread pools, allocators, imports
            assert warm.status_code == 201, warm.text
            before = _peak_rss(pid)
            ram_used = _watch_usage(tmpfs)
            refused = _upload(url, token, foreign, big)
            receive_growth = _peak_rss(pid) - before
            response = _upload(url, token, schema, big)
            ram_peak = ram_used()
            growth = _peak_rss(pid) - before
    assert refused.status_code == 422 and "owner_organisation" in refused.text
    assert receive_growth < 32_000_000, \
        f"receiving {size / 1e6:.0f} MB grew peak RSS by {receive_growth / 1e6:.0f} MB"
    assert response.status_code == 201, response.text
    assert response.json()["versions"][-1]["row_count"] == n
    assert growth < 220_000_000, f"peak RSS grew by {growth / 1e6:.0f} MB"
    assert ram_peak < 8 * 1024 * 1024, f"{ram_peak} bytes of the upload went to {tmpfs}"
    spool = home / "upload-spool"
    assert not spool.exists() or list(spool.iterdir()) == []


def _watch_usage(path: Path):
    """Sample the used bytes of ``path``'s file system until called; returns the call
    that stops and gives the largest increase seen."""
    start = os.statvfs(path)
    base = (start.f_blocks - start.f_bfree) * start.f_frsize
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            st = os.statvfs(path)
            peak[0] = max(peak[0], (st.f_blocks - st.f_bfree) * st.f_frsize - base)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()

    def finish() -> int:
        stop.set()
        thread.join()
        return peak[0]

    return finish
