"""Upload hardening (security review of the upload spool): only the declared multipart
parts, a reaper that cannot remove a live spool, ingest that never outlives its spool or
slot when the request is cancelled, an absolute time limit and a per-organisation share
of the upload slots."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from conftest import Api
from test_upload_limits import BOUNDARY, HEADERS, TAIL, _head, _limits, _spools, _versions

from sandbox.api.uploads import UploadSlots
from sandbox.datasets import catalog
from sandbox.datasets.spool import UploadSpool, reap_stale_uploads
from sandbox.identity.service import Role, create_organisation, create_user, issue_token


@pytest.fixture(scope="module")
def csv_and_schema(demo_files: tuple[Path, Path]) -> tuple[bytes, bytes]:
    data, schema = demo_files
    return pl.read_parquet(data).write_csv().encode(), schema.read_bytes()


def _part(name: str, content: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content \
        + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()  # after a part that ends in its own CRLF


async def _post_as(api: Api, token: str, body: AsyncIterator[bytes] | bytes
                   ) -> httpx.Response:
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sandbox",
                                 timeout=60) as client:
        return await client.post("/v1/datasets", content=body,
                                 headers={**HEADERS, "Authorization": f"Bearer {token}"})


def _post(api: Api, body: AsyncIterator[bytes] | bytes) -> httpx.Response:
    return asyncio.run(_post_as(api, api.home.tokens["owner"], body))


class _Counted:
    """A streaming body from ``pieces`` (made lazily), counting the bytes the server
    pulled."""

    def __init__(self, pieces: Callable[[], Any]) -> None:
        self.pieces = pieces
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces():
            self.pulled += len(piece)
            yield piece
            await asyncio.sleep(0)


# -- 1. only the declared parts ---------------------------------------------------------


def test_an_extra_field_is_refused_naming_it(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    response = _post(api, _head(schema) + csv + b"\r\n" + _part("comment", b"hello")[:-2]
                     + TAIL)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "unexpected form part 'comment'" in detail
    assert "'format', 'schema'" in detail and "'data'" in detail
    assert _versions(api) == 0 and _spools(api) == []


@pytest.mark.parametrize(("parts", "message"), [
    ([("schema", None), ("schema", None)], "form part 'schema' is sent more than once"),
    ([("data", "a.csv"), ("data", "b.csv")], "form part 'data' is sent more than once"),
    ([("data", None)], "form part 'data' must be a file"),
    ([("schema", "schema.yaml")], "form part 'schema' must be a text field, not a file"),
    ([("format", None), ("x" * 500, None)], "unexpected form part 'xxxxxxxx"),
])
def test_duplicate_and_misplaced_parts_are_400(api: Api, parts: list[tuple[str, str | None]],
                                              message: str) -> None:
    body = b"".join(_part(name, b"x", filename) for name, filename in parts) + END
    response = _post(api, body)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]
    assert len(response.json()["detail"]) < 400  # a long name is not echoed whole


def test_many_large_fields_are_refused_at_once_without_memory(api: Api) -> None:
    """20 fields of 1 MiB each were kept in memory (up to the 2 GiB body cap); now the
    first undeclared one ends the request before its data is read."""
    chunk = b"v" * 65536
    header = _part("f0", b"")[:-2]  # the part's headers, no data yet

    def pieces() -> Any:
        for i in range(20):
            yield header.replace(b'"f0"', f'"f{i}"'.encode())
            for _ in range(16):  # 1 MiB of field data
                yield chunk
            yield b"\r\n"
        yield END

    body = _Counted(pieces)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        started = time.monotonic()
        response = _post(api, body)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 400, response.text
    assert "unexpected form part 'f0'" in response.json()["detail"]
    assert body.pulled < 256 * 1024, f"the server read {body.pulled} bytes of the body"
    assert peak < 8 * 1024 * 1024, f"peak traced memory {peak} bytes"
    assert elapsed < 2.0
    assert _spools(api) == []


def test_the_fields_share_one_cap(api: Api) -> None:
    schema = b"#" * (1024 * 1024 - 10)  # under its own cap
    body = _part("schema", schema) + _part("format", b"csv" + b" " * 40) + END
    response = _post(api, body)
    assert response.status_code == 413, response.text
    assert "form fields are larger than 1048576 bytes in all (at field 'format')" \
        in response.json()["detail"]


def test_many_tiny_file_parts_stop_at_the_first_unexpected_one(api: Api, csv_and_schema,
                                                              monkeypatch) -> None:
    """Each file part made a spool file and allocated and wiped ~2 MiB of buffers on the
    event loop (300 parts: 0.2 s); now the second file part ends the request, and only
    one spool writer is ever made."""
    csv, schema = csv_and_schema
    made: list[int] = []
    create = UploadSpool.create
    monkeypatch.setattr(UploadSpool, "create",
                        lambda self: made.append(1) or create(self))

    def pieces() -> Any:
        yield _part("schema", schema) + _part("data", csv[:5000], "data.csv")
        for i in range(5000):
            yield _part(f"extra{i}", b"x", "x.csv")
        yield END

    body = _Counted(pieces)
    started = time.monotonic()
    response = _post(api, body)
    elapsed = time.monotonic() - started
    assert response.status_code == 400, response.text
    assert "unexpected form part 'extra0'" in response.json()["detail"]
    assert len(made) == 1
    assert body.pulled < len(schema) + 5000 + 10 * 200, body.pulled
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    assert _versions(api) == 0 and _spools(api) == []


# -- 2. the start-up reaper and a live spool ----------------------------------------------


def test_a_reaper_running_as_a_spool_is_made_leaves_it_alone(tmp_path: Path,
                                                            monkeypatch) -> None:
    """Another API process starting on the same spool root reaps right after this one
    made its spool directory, before it could lock it."""
    root = tmp_path / "spool"
    mkdtemp = tempfile.mkdtemp
    reaped: list[int] = []

    def made_then_reaped(*args: Any, **kwargs: Any) -> str:
        directory = mkdtemp(*args, **kwargs)
        reaped.append(reap_stale_uploads(root))
        return directory

    monkeypatch.setattr(tempfile, "mkdtemp", made_then_reaped)
    with UploadSpool(root, chunk_size=1000) as live:
        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
        assert reaped == [0]
        assert live.directory.is_dir() and live.directory.name.startswith("sbx-upload-")
        writer = live.create()
        writer.write(b"still uploading")
        file = writer.finish()
        assert reap_stale_uploads(root) == 0  # locked: a later reaper leaves it too
        with file.open() as reader:
            assert reader.read() == b"still uploading"
    assert list(root.iterdir()) == []


def test_the_reaper_holds_the_lock_while_it_removes(tmp_path: Path, monkeypatch) -> None:
    import fcntl
    import shutil

    root = tmp_path / "spool"
    stale = root / "sbx-upload-999999999-abcdefgh"
    stale.mkdir(parents=True)
    (stale / "part-1").write_bytes(b"x")
    rmtree = shutil.rmtree
    free_meanwhile: list[bool] = []

    def probing_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path) == stale:  # would a new owner get the lock now?
            fd = os.open(stale, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free_meanwhile.append(True)
            except BlockingIOError:
                free_meanwhile.append(False)
            finally:
                os.close(fd)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", probing_rmtree)
    assert reap_stale_uploads(root) == 1
    assert free_meanwhile == [False] and not stale.exists()


def test_staging_directories_are_reaped_only_when_old(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    old, fresh = root / ".sbx-upload-tmp-123-old", root / ".sbx-upload-tmp-123-new"
    for directory in (old, fresh):
        directory.mkdir(parents=True)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert reap_stale_uploads(root) == 1
    assert [p.name for p in root.iterdir()] == [fresh.name]


# -- 3. a cancelled request and its ingest ------------------------------------------------


def test_a_cancelled_request_waits_for_its_ingest(api: Api, csv_and_schema,
                                                 monkeypatch) -> None:
    """Shutdown cancels the request while ingest runs in its thread: the spool is removed
    and the slot released only after that thread has ended, which gives up storing."""
    csv, schema = csv_and_schema
    events: list[str] = []
    in_ingest, go_on = threading.Event(), threading.Event()
    register = catalog.register

    def blocking_register(*args: Any, progress: Any = None, **kwargs: Any) -> str:
        def hook(done: int) -> None:
            in_ingest.set()
            go_on.wait(10)
            if progress is not None:
                progress(done)
        try:
            return register(*args, progress=hook, **kwargs)
        finally:
            events.append("ingest ended")

    close, release = UploadSpool.close, UploadSlots.release

    def closing(self: UploadSpool) -> None:
        if not self.closed:
            events.append("spool closed")
        close(self)

    def releasing(self: UploadSlots, *args: Any) -> None:
        events.append("slot released")
        release(self, *args)

    monkeypatch.setattr(catalog, "register", blocking_register)
    monkeypatch.setattr(UploadSpool, "close", closing)
    monkeypatch.setattr(UploadSlots, "release", releasing)
    cpu: list[float] = []

    async def scenario() -> None:
        request = asyncio.create_task(_post_as(api, api.home.tokens["owner"],
                                               _head(schema) + csv + TAIL))
        while not in_ingest.is_set():
            await asyncio.sleep(0.01)
        cpu.append(time.process_time())
        request.cancel()

        def later() -> None:
            cpu.append(time.process_time())
            go_on.set()

        threading.Timer(0.4, later).start()
        with contextlib.suppress(asyncio.CancelledError):
            await request
        events.append("request ended")

    asyncio.run(scenario())
    go_on.wait(10)
    deadline = time.monotonic() + 10
    while "ingest ended" not in events:  # (before the fix: a thread left behind)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert events == ["ingest ended", "spool closed", "slot released", "request ended"]
    assert cpu[1] - cpu[0] < 0.25, "the cancelled request spun while it waited"
    assert _versions(api) == 0 and list(api.home.settings.data_dir.iterdir()) == []
    assert list(api.home.settings.effective_upload_spool_dir.iterdir()) == []
    assert api.app.state.upload_slots.active == 0


def test_a_spool_closing_meanwhile_is_no_error_for_a_reader(tmp_path: Path,
                                                           monkeypatch) -> None:
    """Closing marks the spool closed and forgets its files in one step: a path lookup
    in the middle of ``close`` gets ``None`` (not a spool file any more), never the closed
    spool's ValueError (a 500)."""
    from sandbox.datasets.spool import SpoolWriter, open_plaintext

    spool = UploadSpool(tmp_path / "spool", chunk_size=1000)
    writer = spool.create()
    writer.write(b"abc")
    file = writer.finish()
    spool.create()  # unfinished: close() aborts it
    seen: list[object] = []
    abort = SpoolWriter.abort

    def looking_abort(self: SpoolWriter) -> None:
        try:
            seen.append(open_plaintext(file.path))
        except ValueError as exc:
            seen.append(exc)
        abort(self)

    monkeypatch.setattr(SpoolWriter, "abort", looking_abort)
    spool.close()
    assert seen == [None]


# -- 4. an absolute time limit and a per-organisation share of the slots -----------------


def test_an_upload_is_cut_off_at_the_absolute_time_limit(api: Api, csv_and_schema) -> None:
    """Bursts just often enough to pass the idle timeout and the average rate could
    hold a slot for ~9 hours; the absolute limit ends any upload."""
    csv, schema = csv_and_schema
    _limits(api, idle=5.0, rate=0)
    api.home.runtime.settings.upload_max_seconds = 0.5

    async def steady() -> AsyncIterator[bytes]:
        data = _head(schema) + csv + TAIL
        for i in range(0, len(data), 2000):
            yield data[i:i + 2000]
            await asyncio.sleep(0.05)

    started = time.monotonic()
    response = _post(api, steady())
    elapsed = time.monotonic() - started
    assert response.status_code == 408, response.text
    detail = response.json()["detail"]
    assert "not complete after 0.5 seconds" in detail and "SANDBOX_UPLOAD_MAX_SECONDS" in detail
    assert response.headers["connection"] == "close"
    assert 0.5 <= elapsed < 2.5
    assert _versions(api) == 0 and _spools(api) == []


def _other_owner(api: Api) -> str:
    with api.home.runtime.db.transaction() as session:
        create_organisation(session, "other-bureau", actor_id=None)
        user = create_user(session, "other-owner", org_name="other-bureau", role=Role.OWNER,
                           actor_id=None)
        return issue_token(session, user, actor_id=None)


def test_one_organisation_gets_only_its_share_of_the_slots(api: Api, csv_and_schema) -> None:
    csv, schema = csv_and_schema
    _limits(api, concurrent=3)
    api.home.runtime.settings.max_concurrent_uploads_per_org = 1
    other = _other_owner(api)
    other_schema = schema.replace(b"owner_organisation: jiangsu-data-bureau",
                                  b"owner_organisation: other-bureau") \
        .replace(b"name: enterprises\n", b"name: other_enterprises\n", 1)
    owner = api.home.tokens["owner"]

    async def scenario() -> tuple[httpx.Response, ...]:
        holding, release = asyncio.Event(), asyncio.Event()

        async def held() -> AsyncIterator[bytes]:
            yield _head(schema) + csv[:1000]
            holding.set()
            await release.wait()
            yield csv[1000:] + TAIL

        first = asyncio.create_task(_post_as(api, owner, held()))
        await holding.wait()
        same_org = await _post_as(api, owner, _head(schema) + csv + TAIL)
        other_org = await _post_as(api, other, _head(other_schema) + csv + TAIL)
        release.set()
        return await first, same_org, other_org, \
            await _post_as(api, owner, _head(schema) + csv + TAIL)

    first, same_org, other_org, again = asyncio.run(scenario())
    assert same_org.status_code == 503, same_org.text
    assert same_org.headers["retry-after"] == "30"
    detail = same_org.json()["detail"]
    assert "for your organisation (at most 1 at once per organisation" in detail
    assert "SANDBOX_MAX_CONCURRENT_UPLOADS_PER_ORG" in detail
    assert other_org.status_code == 201, other_org.text
    assert first.status_code == 201, first.text
    assert again.status_code == 201, again.text  # the organisation's slot came back
    assert api.app.state.upload_slots.active == 0
    assert api.app.state.upload_slots.by_owner == {}


def test_slot_accounting() -> None:
    slots = UploadSlots()
    assert slots.try_acquire("a", 3, 2) is None
    assert slots.try_acquire("a", 3, 2) is None
    assert slots.try_acquire("a", 3, 2) == "owner"
    assert slots.try_acquire("b", 3, 2) is None
    assert slots.try_acquire("c", 3, 2) == "total"
    slots.release("a")
    assert slots.try_acquire("c", 3, 2) is None
    for owner in ("a", "b", "c"):
        slots.release(owner)
    assert slots.active == 0 and slots.by_owner == {}
