"""Master-key rotation, crypto-shredding, missing keys, and no plaintext left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import QUERY, Api
from sqlalchemy import select

from sandbox.datasets.catalog import unwrap_data_key
from sandbox.datasets.keys import KeyUnavailable
from sandbox.datasets.lifecycle import rotate_master_key
from sandbox.db.models import AuditEvent, DatasetVersion


def _submit(api: Api) -> str:
    response = api.as_("analyst").post("/v1/jobs", json={"query": QUERY})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _status(api: Api, job_id: str) -> dict:
    return api.as_("analyst").get(f"/v1/jobs/{job_id}").json()


def _spent(api: Api) -> float:
    return api.as_("analyst").get("/v1/budget/enterprises").json()["spent"]


def test_rotation_rewraps_without_reencrypting(ready: Api) -> None:
    home = ready.home
    with home.runtime.db.transaction() as session:
        before = session.scalar(select(DatasetVersion))
        assert before is not None
    ciphertext = (home.settings.data_dir / before.storage_file).read_bytes()
    old_key = before.key_id
    rotation = rotate_master_key(home.runtime.db, home.runtime.keys, retire_old=True)
    assert rotation.rewrapped == 1 and rotation.retired == (old_key,)
    assert home.runtime.keys.key_ids() == [rotation.new_key_id]
    assert len(list(home.settings.keys_dir.glob("master-*.key"))) == 1
    with home.runtime.db.transaction() as session:
        after = session.scalar(select(DatasetVersion))
        assert after is not None and after.key_id == rotation.new_key_id
        assert after.wrapped_key != before.wrapped_key
        actions = list(session.scalars(select(AuditEvent.action)))
        assert "keys.rotated" in actions and "keys.retired" in actions
    assert (home.settings.data_dir / after.storage_file).read_bytes() == ciphertext
    job_id = _submit(ready)
    home.worker().run_once()
    assert _status(ready, job_id)["status"] == "pending_review"


def test_rotation_keeps_old_key_until_retired(ready: Api) -> None:
    home = ready.home
    rotation = rotate_master_key(home.runtime.db, home.runtime.keys, retire_old=False)
    assert len(home.runtime.keys.key_ids()) == 2 and rotation.retired == ()


def test_missing_master_key_fails_closed_naming_the_dataset(ready: Api) -> None:
    home = ready.home
    for path in home.settings.keys_dir.glob("master-*.key"):
        os.unlink(path)
    home.runtime.keys._cache.clear()  # type: ignore[attr-defined]
    with home.runtime.db.transaction() as session:
        version = session.scalar(select(DatasetVersion))
        assert version is not None
        with pytest.raises(KeyUnavailable, match=version.dataset_id):
            unwrap_data_key(version, home.runtime.keys)
    job_id = _submit(ready)
    home.worker().run_once()
    status = _status(ready, job_id)
    assert status["status"] == "failed" and "key is not available" in status["error"]
    assert _spent(ready) == 0  # keys are not data: refused before the charge


def test_delete_shreds_keys_and_files(ready: Api, demo_files) -> None:
    home = ready.home
    queued = _submit(ready)
    with home.runtime.db.transaction() as session:
        version = session.scalar(select(DatasetVersion))
        assert version is not None
        stored = home.settings.data_dir / version.storage_file
    assert stored.exists()
    assert ready.as_("analyst").delete("/v1/datasets/enterprises").status_code == 403
    response = ready.as_("owner").delete("/v1/datasets/enterprises")
    assert response.status_code == 200 and response.json()["versions_shredded"] == 1
    assert not stored.exists()
    with home.runtime.db.transaction() as session:
        assert session.scalar(select(DatasetVersion.wrapped_key)) is None
    assert ready.as_("analyst").get("/v1/datasets/enterprises").status_code == 404
    assert ready.as_("analyst").get("/v1/datasets").json() == []
    home.worker().run_once()
    assert _status(ready, queued)["status"] == "failed"
    ready.register(demo_files)  # the name is free again, as a new dataset
    assert ready.as_("owner").get("/v1/datasets/enterprises").status_code == 200


def _snapshot(directory: Path) -> set[Path]:
    return set(directory.rglob("*")) if directory.is_dir() else set()


def _holds(path: Path, needles: list[bytes]) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > 64 * 1024 * 1024:
            return False
        content = path.read_bytes()
    except OSError:  # removed meanwhile, or not ours to read
        return False
    # a decrypted copy of the dataset is zstd Parquet: its values are not visible as bytes
    return content[:4] == b"PAR1" or any(needle in content for needle in needles)


SCRIPT = """
from sandbox.sdk import datasets, count, emit
emit("n", datasets["enterprises"].group_by("city").agg(count()).release(epsilon=0.1))
"""


def test_no_plaintext_key_or_decrypted_file_left_after_jobs(
        ready: Api, demo_files: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    """After query and script jobs: no file anywhere in the temp directories (RAM or
    disk) and no log record holds a row's value or key material, no decrypted file
    remains, and the environment holds no key."""
    import base64
    import logging
    import shutil
    import tempfile

    import pyarrow.parquet as pq

    home = ready.home
    ids = pq.read_table(demo_files[0], columns=["enterprise_id"]).column(0).to_pylist()
    markers = [i.encode() for i in ids[:500]]  # random ids: only the data holds them
    with home.runtime.db.transaction() as session:
        version = session.scalar(select(DatasetVersion))
        assert version is not None
        data_key = unwrap_data_key(version, home.runtime.keys)
    master = [p.read_bytes() for p in home.settings.keys_dir.glob("master-*.key")]
    secrets = [k for raw in [data_key, *master]
               for k in (raw, raw.hex().encode(), base64.b64encode(raw),
                         base64.urlsafe_b64encode(raw).rstrip(b"="))]
    places = {Path("/dev/shm"), home.settings.tmpfs_dir, Path(tempfile.gettempdir())}
    before = {place: _snapshot(place) for place in places}
    caplog.set_level(logging.DEBUG)

    worker = home.worker()
    jobs = [_submit(ready), _submit(ready)]
    if shutil.which("bwrap") is not None:  # CI has it (the script-job tests require it)
        script = ready.as_("analyst").post("/v1/jobs", json={
            "kind": "script", "script": {"dataset": "enterprises", "source": SCRIPT,
                                         "mode": "real"}})
        assert script.status_code == 201, script.text
        jobs.append(script.json()["id"])
    for _ in jobs:
        assert worker.run_once()
    for job_id in jobs:
        assert _status(ready, job_id)["status"] == "pending_review"
    assert worker.cache.misses == 1 and worker.cache.hits == len(jobs) - 1

    for place in places:
        new = _snapshot(place) - before[place]
        assert not [p for p in new if p.name.startswith("sbx-") and "upload" not in p.name]
        assert not [p for p in new if _holds(p, markers + secrets)], place
    logged = caplog.text.encode()
    assert caplog.records, "the worker logged nothing: the check would be empty"
    assert not any(needle in logged for needle in markers + secrets)
    environment = Path("/proc/self/environ").read_bytes()
    assert not any(needle in environment for needle in markers + secrets)
    worker.cache.clear()
    assert worker.cache.size == 0 and worker.cache.held == 0


def test_engine_scans_the_cached_ram_buffer_in_place(ready: Api,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.jobs.worker as worker_module
    from sandbox.datasets.plaintext import PlainBuffer

    sources: list[object] = []
    during: list[set[Path]] = []
    real = worker_module.DatasetHandle

    def spy(source: object) -> object:
        sources.append(source)
        during.append(set(ready.home.settings.tmpfs_dir.iterdir()))
        return real(source)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_module, "DatasetHandle", spy)
    before = set(ready.home.settings.tmpfs_dir.iterdir())
    worker = ready.home.worker()
    job_id = _submit(ready)
    assert worker.run_once()
    assert _status(ready, job_id)["status"] == "pending_review"
    assert len(sources) == 1 and isinstance(sources[0], PlainBuffer)
    assert sources[0].size == worker.cache.size > 0  # the cache's buffer, no copy
    assert during[0] == before  # no per-job file on tmpfs
    worker.cache.clear()
    assert sources[0].closed


def test_orphaned_plaintext_is_reaped_at_start(ready: Api) -> None:
    orphan = Path("/dev/shm") / "sbx-plain-999999999-test"
    orphan.mkdir()
    (orphan / "data.parquet").write_bytes(b"x")
    ready.home.worker()
    assert not orphan.exists()


def test_a_rotation_during_an_ingest_never_strands_the_new_version(
        ready: Api, demo_files: tuple[Path, Path]) -> None:
    """The data key of a version being ingested is wrapped at commit time, under the key
    current then: a rotation that retires the old key mid-ingest cannot orphan it."""
    from sandbox.datasets import catalog, store
    from sandbox.datasets.schema import DatasetSchema
    from sandbox.db.models import User
    from sandbox.identity.service import Principal, Role

    home = ready.home
    data, schema_file = demo_files
    with home.runtime.db.transaction() as session:
        owner = session.scalar(select(User).where(User.role == "owner"))
        assert owner is not None
        principal = Principal(user_id=owner.id, name=owner.name, org_id=owner.org_id,
                              role=Role.OWNER)
        old_key = session.scalar(select(DatasetVersion.key_id))
    rotations: list[str] = []

    def rotate_once(_consumed: int) -> None:  # another process's `keys rotate --retire`
        if not rotations:
            rotation = rotate_master_key(home.runtime.db, home.runtime.keys, retire_old=True)
            assert rotation.retired == (old_key,)
            rotations.append(rotation.new_key_id)

    dataset_id = catalog.register(
        home.runtime.db, principal=principal,
        schema=DatasetSchema.from_yaml(schema_file.read_text()), source=data,
        data_dir=home.settings.data_dir, keys=home.runtime.keys, progress=rotate_once)
    assert rotations, "the ingest reported no progress: the race was not exercised"
    assert home.runtime.keys.key_ids() == rotations
    with home.runtime.db.transaction() as session:
        versions = list(session.scalars(select(DatasetVersion).order_by(DatasetVersion.version)))
        assert [v.version for v in versions] == [1, 2]
        assert {v.key_id for v in versions} == set(rotations)
        for version in versions:
            key = unwrap_data_key(version, home.runtime.keys)
            plain = store.decrypt_to_bytes(home.settings.data_dir / version.storage_file, key,
                                           dataset_id=dataset_id, version=version.version)
            assert plain[:4] == b"PAR1"


def test_keyring_lock_serialises_postgresql_transactions(pg_url: str) -> None:
    from sqlalchemy import text

    from sandbox.datasets.catalog import KEYRING_LOCK
    from sandbox.db import Database, hold_lock
    from sandbox.db.session import advisory_key

    db = Database(pg_url)
    try:
        with db.engine.connect() as other:
            def free() -> bool:
                with other.begin():
                    return bool(other.execute(text(
                        "SELECT pg_try_advisory_xact_lock(CAST(:k AS bigint))"),
                        {"k": advisory_key(KEYRING_LOCK)}).scalar())

            assert free()
            with db.transaction() as session:
                hold_lock(session, KEYRING_LOCK)
                assert not free()  # held until this transaction ends
            assert free()
    finally:
        db.dispose()


def test_a_starting_worker_reserves_memory_for_the_largest_dataset(
        ready: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.jobs.worker as worker_module

    home = ready.home
    with home.runtime.db.transaction() as session:
        size = session.scalar(select(DatasetVersion.plaintext_bytes))
    worker = home.worker()
    assert worker.reserve_cache_memory() == size
    [reserved] = worker.cache._spare  # type: ignore[attr-defined]
    used: list[object] = []
    real = worker_module.DatasetHandle
    monkeypatch.setattr(worker_module, "DatasetHandle",
                        lambda source: used.append(source) or real(source))
    job_id = _submit(ready)
    assert worker.run_once()
    assert _status(ready, job_id)["status"] == "pending_review"
    assert used == [reserved]  # the first job decrypted into the memory faulted in ahead
    worker.cache.clear()
    assert ready.as_("owner").delete("/v1/datasets/enterprises").status_code == 200
    assert home.worker().reserve_cache_memory() == 0  # nothing live: nothing reserved


def test_run_forever_reserves_in_the_background_and_releases_at_stop(ready: Api) -> None:
    import threading
    import time

    worker = ready.home.worker()
    loop = threading.Thread(target=worker.run_forever)
    loop.start()
    try:
        deadline = time.monotonic() + 30
        while worker.cache.held == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.cache.held > 0
    finally:
        worker.stop()
        loop.join(timeout=30)
    assert not loop.is_alive() and worker.cache.held == 0


def test_two_rotations_at_once_never_strand_a_version(
        ready: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotation A has made its key when rotation B (another process's `keys rotate
    --retire`) starts: B must not retire A's key and then have A wrap everything under
    it. Each rotation makes its key inside its locked transaction, so B waits for A."""
    import threading

    from sandbox.datasets.keyring import LocalKeyring

    home = ready.home
    real = LocalKeyring.create_next
    a_made_its_key, b_finished = threading.Event(), threading.Event()

    def slow_first(self: LocalKeyring):  # type: ignore[no-untyped-def]
        key = real(self)
        if not a_made_its_key.is_set():
            a_made_its_key.set()
            b_finished.wait(2)  # B gets every chance to run in between
        return key

    monkeypatch.setattr(LocalKeyring, "create_next", slow_first)
    errors: list[BaseException] = []

    def rotate() -> None:
        try:
            rotate_master_key(home.runtime.db, LocalKeyring(home.settings.keys_dir),
                              retire_old=True)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    a = threading.Thread(target=rotate)
    a.start()
    assert a_made_its_key.wait(10)
    b = threading.Thread(target=lambda: (rotate(), b_finished.set()))
    b.start()
    a.join(60)
    b.join(60)
    assert not errors
    keys = LocalKeyring(home.settings.keys_dir)
    assert len(keys.key_ids()) == 1
    with home.runtime.db.transaction() as session:
        for version in session.scalars(select(DatasetVersion)):
            assert version.key_id == keys.current().key_id
            unwrap_data_key(version, keys)  # raises if stranded
