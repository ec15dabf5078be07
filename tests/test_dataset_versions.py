"""Registration: versions are immutable (a new upload is a new version, and jobs keep the
version they were submitted against), and a file that decodes to far more than its size
is refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import QUERY, Api
from sqlalchemy import select

from sandbox.datasets.generator import write_demo_files
from sandbox.db.models import DatasetVersion


def _versions(api: Api) -> list[tuple[int, str, bytes | None, str, int]]:
    with api.home.runtime.db.transaction() as session:
        return [(v.version, v.ciphertext_sha256, v.wrapped_key, v.storage_file,
                 v.plaintext_bytes)
                for v in session.scalars(select(DatasetVersion)
                                         .order_by(DatasetVersion.version))]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_new_upload_is_a_new_version_and_the_old_one_is_untouched(
        ready: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.jobs.worker as worker_module

    data_dir = ready.home.settings.data_dir
    [first] = _versions(ready)
    first_file = _digest(data_dir / first[3])
    analyst = ready.as_("analyst")
    on_v1 = analyst.post("/v1/jobs", json={"query": QUERY})
    assert on_v1.status_code == 201 and on_v1.json()["dataset_version"] == 1

    ready.register(write_demo_files(tmp_path / "v2", 5_000, 11))  # the owner's new upload
    versions = _versions(ready)
    assert [v[0] for v in versions] == [1, 2]
    assert versions[0] == first  # the row (hash, wrapped key, file, size) is unchanged
    assert _digest(data_dir / first[3]) == first_file == first[1]  # and so is the file
    assert versions[1][3] != first[3] and versions[1][4] < first[4]
    detail = ready.as_("owner").get("/v1/datasets/enterprises").json()
    assert [(v["version"], v["row_count"]) for v in detail["versions"]] == [(1, 20_000),
                                                                            (2, 5_000)]
    on_v2 = analyst.post("/v1/jobs", json={"query": QUERY})
    assert on_v2.status_code == 201 and on_v2.json()["dataset_version"] == 2

    scanned: list[int] = []  # the plaintext size of what each job's engine scanned
    real = worker_module.DatasetHandle

    def spy(source: object) -> object:
        scanned.append(source.size)  # type: ignore[attr-defined]
        return real(source)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_module, "DatasetHandle", spy)
    worker = ready.home.worker()
    assert worker.run_once() and worker.run_once()
    assert scanned == [first[4], versions[1][4]]  # each job read its own version
    for job in (on_v1, on_v2):
        status = analyst.get(f"/v1/jobs/{job.json()['id']}").json()
        assert status["status"] == "pending_review", status
    worker.cache.clear()


def test_registration_refuses_a_decompression_bomb_and_stores_nothing(
        ready: Api, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sandbox.datasets import catalog
    from sandbox.datasets.generator import enterprise_schema
    from sandbox.datasets.ingest import IngestError
    from sandbox.db.models import User
    from sandbox.identity.service import Principal, Role

    one = {"enterprise_id": "E0000000001", "city": "Nanjing", "industry": "manufacturing",
           "employees": 10, "annual_revenue": 100.0, "tax_paid": 5.0, "founded_year": 2000}
    rows = 1_000_000
    bomb = tmp_path / "bomb.parquet"  # one row a million times: a few KB of zstd Parquet
    pq.write_table(pa.table({k: [v] * rows for k, v in one.items()}), bomb,
                   compression="zstd")
    size = bomb.stat().st_size
    assert size * catalog.PLAINTEXT_EXPANSION < rows * 50  # decodes to far more
    home = ready.home
    with home.runtime.db.transaction() as session:
        owner = session.scalar(select(User).where(User.role == "owner"))
        assert owner is not None
    principal = Principal(user_id=owner.id, name=owner.name, org_id=owner.org_id,
                          role=Role.OWNER)
    stored = set(home.settings.data_dir.iterdir())
    schema = enterprise_schema(rows)
    with pytest.raises(IngestError, match="decoded data exceeds the limit"):
        catalog.register(home.runtime.db, principal=principal, schema=schema, source=bomb,
                         data_dir=home.settings.data_dir, keys=home.runtime.keys,
                         max_bytes=size)
    assert set(home.settings.data_dir.iterdir()) == stored
    assert [v[0] for v in _versions(ready)] == [1]


def test_a_public_row_count_is_per_version(ready: Api, tmp_path: Path) -> None:
    data, schema = write_demo_files(tmp_path / "v2", 5_000, 11)
    text = schema.read_text()
    assert "row_count_public: false" in text
    schema.write_text(text.replace("row_count_public: false", "row_count_public: true"))
    ready.register((data, schema))
    analyst = ready.as_("analyst").get("/v1/datasets/enterprises").json()
    # v2 is marked public; v1 was registered private and stays so
    assert [(v["version"], v["row_count"]) for v in analyst["versions"]] == [(1, None),
                                                                             (2, 5_000)]
