"""Upload limits against real slow clients (attack catalogue 59): idle timeout, minimum
rate, concurrent uploads, a full disk; the encrypted spool is always removed.

Clients are httpx ``AsyncClient``s on the ASGI app whose streaming bodies really sleep
(the app's timeouts run on the real clock), plus raw sockets against uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest
import uvicorn
from conftest import Api
from sqlalchemy import func, select

from sandbox.db.models import DatasetVersion

BOUNDARY = "sbxlimitsboundary"
HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture(scope="module")
def csv_and_schema(demo_files: tuple[Path, Path]) -> tuple[bytes, bytes]:
    data, schema = demo_files
    return pl.read_parquet(data).write_csv().encode(), schema.read_bytes()


def _head(schema: bytes, filename: str = "data.csv") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"schema\"\r\n\r\n".encode()
            + schema + f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"data\"; "
                       f"filename=\"{filename}\"\r\n\r\n".encode())


TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def _spools(api: Api) -> list[Path]:
    root = api.home.settings.effective_upload_spool_dir
    return sorted(root.glob("sbx-upload-*/*")) if root.is_dir() else []


def _versions(api: Api) -> int:
    with api.home.runtime.db.transaction() as session:
        return session.scalar(select(func.count()).select_from(DatasetVersion)) or 0


def _assert_nothing_left(api: Api) -> None:
    assert _versions(api) == 0
    assert list(api.home.settings.data_dir.iterdir()) == []
    root = api.home.settings.effective_upload_spool_dir
    assert not root.is_dir() or list(root.iterdir()) == []


def _limits(api: Api, *, idle: float = 30.0, rate: int = 0, grace: float = 0.0,
            concurrent: int = 4) -> None:
    settings = api.home.runtime.settings
    settings.upload_idle_timeout_seconds = idle
    settings.upload_min_bytes_per_second = rate
    settings.upload_rate_grace_seconds = grace
    settings.max_concurrent_uploads = concurrent


async def _post(api: Api, body: AsyncIterator[bytes] | bytes) -> httpx.Response:
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox",
                                 timeout=60) as client:
        return await client.post("/v1/datasets", content=body, headers={
            **HEADERS, "Authorization": f"Bearer {api.home.tokens['owner']}"})


async def _chunks(data: bytes, size: int, pause: float) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
        await asyncio.sleep(pause)


def test_stalled_upload_is_cut_off_at_the_idle_timeout(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    _limits(api, idle=0.3)
    seen: list[int] = []

    async def stalls() -> AsyncIterator[bytes]:
        yield _head(schema) + csv[:-1000]  # over one 1 MiB spool record
        await asyncio.sleep(0.05)
        seen.extend(p.stat().st_size for p in _spools(api))  # the partial file, meanwhile
        await asyncio.sleep(5)  # the client goes silent
        yield csv[-1000:] + TAIL

    started = time.monotonic()
    response = asyncio.run(_post(api, stalls()))
    elapsed = time.monotonic() - started
    assert response.status_code == 408, response.text
    detail = response.json()["detail"]
    assert "no data for 0.3 seconds" in detail and "SANDBOX_UPLOAD_IDLE_TIMEOUT_SECONDS" in detail
    assert response.headers["connection"] == "close"
    assert elapsed < 2.0, f"cut off after {elapsed:.1f} s, not at the 0.3 s idle timeout"
    assert len(seen) == 1 and seen[0] > 1024 * 1024
    _assert_nothing_left(api)


def test_trickling_upload_is_cut_off_at_the_minimum_rate(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    _limits(api, idle=5.0, rate=200_000, grace=0.5)  # never idle, but ~20 kB/s

    started = time.monotonic()
    response = asyncio.run(_post(api, _chunks(_head(schema) + csv + TAIL, 1000, 0.05)))
    elapsed = time.monotonic() - started
    assert response.status_code == 408, response.text
    detail = response.json()["detail"]
    assert "upload too slow" in detail and "200000 bytes/s" in detail
    assert "SANDBOX_UPLOAD_MIN_BYTES_PER_SECOND" in detail
    assert 0.5 <= elapsed < 3.0
    _assert_nothing_left(api)


def test_a_steady_upload_within_the_limits_is_stored(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    _limits(api, idle=0.5, rate=100_000, grace=0.5)  # chunks 0.1 s apart, ~1.6 MB/s
    body = _head(schema) + csv + TAIL
    response = asyncio.run(_post(api, _chunks(body, len(body) // 8 + 1, 0.1)))
    assert response.status_code == 201, response.text
    assert _versions(api) == 1
    assert _spools(api) == []


def test_concurrent_uploads_over_the_cap_get_503(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    _limits(api, concurrent=1)

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        holding = asyncio.Event()
        release = asyncio.Event()

        async def first() -> AsyncIterator[bytes]:
            yield _head(schema) + csv[:1000]
            holding.set()
            await release.wait()
            yield csv[1000:] + TAIL

        first_upload = asyncio.create_task(_post(api, first()))
        await holding.wait()
        second = await _post(api, _head(schema) + csv + TAIL)
        release.set()
        done = await first_upload
        third = await _post(api, _head(schema) + csv + TAIL)  # a second version
        return second, done, third

    second, first, third = asyncio.run(scenario())
    assert second.status_code == 503, second.text
    assert second.headers["retry-after"] == "30"
    assert "too many uploads in progress" in second.json()["detail"]
    assert "SANDBOX_MAX_CONCURRENT_UPLOADS" in second.json()["detail"]
    assert first.status_code == 201, first.text
    assert third.status_code == 201, third.text  # the slot was released
    assert _versions(api) == 2 and _spools(api) == []


def test_a_refused_upload_frees_its_slot(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    _limits(api, idle=0.2, concurrent=1)

    async def stalls() -> AsyncIterator[bytes]:
        yield _head(schema)
        await asyncio.sleep(5)

    assert asyncio.run(_post(api, stalls())).status_code == 408
    api.home.runtime.settings.upload_idle_timeout_seconds = 30
    assert asyncio.run(_post(api, _head(schema) + csv + TAIL)).status_code == 201


# -- a full disk ------------------------------------------------------------------------


@contextlib.contextmanager
def _small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` at ``path`` (a tmpfs mount: needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_errors_are_507_without_root(api: Api, csv_and_schema,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The same answers where no small file system can be mounted: the spool's writes
    (then the store's) fail as a full disk does."""
    import errno

    from sandbox.datasets import spool, store

    csv, schema = csv_and_schema
    write = spool.SpoolWriter.write

    def filling(self: spool.SpoolWriter, data: bytes) -> int:
        if self.size > 300_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return write(self, data)

    with monkeypatch.context() as patch:
        patch.setattr(spool.SpoolWriter, "write", filling)
        response = asyncio.run(_post(api, _chunks(_head(schema) + csv + TAIL, 65536, 0)))
    assert response.status_code == 507, response.text
    assert "after" in response.json()["detail"] and str(api.home.settings.home) \
        not in response.json()["detail"]

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(store, "_write_parquet", full)
    response = asyncio.run(_post(api, _head(schema) + csv + TAIL))
    assert response.status_code == 507, response.text
    assert "to store the dataset" in response.json()["detail"]
    _assert_nothing_left(api)


def test_full_spool_disk_is_507_not_malformed(api: Api, csv_and_schema, tmp_path: Path) -> None:
    csv, schema = csv_and_schema
    with _small_filesystem(tmp_path / "spool", "256k") as spool:
        api.home.runtime.settings.upload_spool_dir = spool
        streamed = asyncio.run(_post(api, _chunks(_head(schema) + csv + TAIL, 65536, 0)))
        assert streamed.status_code == 507, streamed.text
        assert "no space left on the server to receive the upload" in streamed.json()["detail"]
        declared = api.as_("owner").post("/v1/datasets", data={"schema": schema.decode()},
                                         files={"data": ("d.csv", csv)})  # Content-Length
        assert declared.status_code == 507, declared.text
        assert "not enough space" in declared.json()["detail"]
        assert list(spool.iterdir()) == []
    _assert_nothing_left(api)


def test_full_data_disk_is_507(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    with _small_filesystem(api.home.settings.data_dir, "64k"):
        response = api.as_("owner").post("/v1/datasets", data={"schema": schema.decode()},
                                         files={"data": ("d.csv", csv)})
        assert response.status_code == 507, response.text
        assert "no space left on the server to store the dataset" in response.json()["detail"]
        assert list(api.home.settings.data_dir.iterdir()) == []
    _assert_nothing_left(api)


# -- a real server and raw sockets ---------------------------------------------------------


@contextlib.contextmanager
def _server(api: Api) -> Iterator[int]:
    config = uvicorn.Config(api.app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def _raw_request(api: Api, body_length: int) -> bytes:
    return (f"POST /v1/datasets HTTP/1.1\r\nHost: sandbox\r\n"
            f"Authorization: Bearer {api.home.tokens['owner']}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {body_length}\r\n\r\n").encode()


def test_slowloris_socket_gets_408_and_is_closed(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    _limits(api, idle=0.5)
    body = _head(schema) + csv + TAIL
    with _server(api) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_raw_request(api, len(body)) + body[:50_000])  # then silence
        sock.settimeout(10)
        started = time.monotonic()
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            reply += chunk
        assert time.monotonic() - started < 5
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"no data for 0.5 seconds" in reply
    _assert_nothing_left(api)


def test_client_disconnect_mid_upload_removes_the_spool(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    body = _head(schema) + csv + TAIL
    with _server(api) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(_raw_request(api, len(body)) + body[:300_000])
            deadline = time.monotonic() + 5
            while not _spools(api):  # the server is spooling the partial upload
                assert time.monotonic() < deadline
                time.sleep(0.01)
        deadline = time.monotonic() + 5
        while _spools(api) or list(api.home.settings.effective_upload_spool_dir.iterdir()):
            assert time.monotonic() < deadline, "the spool of a dropped upload stayed"
            time.sleep(0.02)
    _assert_nothing_left(api)
