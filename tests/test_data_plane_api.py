"""The data plane through the API: bad uploads leave nothing, mock data, tampering."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from conftest import QUERY, Api
from sqlalchemy import func, select

from sandbox.datasets.ingest import read_validated
from sandbox.datasets.schema import DatasetSchema
from sandbox.db.models import Dataset, DatasetVersion


def _upload(api: Api, schema_text: str, name: str, payload: bytes):
    return api.as_("owner").post("/v1/datasets", data={"schema": schema_text},
                                 files={"data": (name, payload)})


def _nothing_stored(api: Api) -> None:
    home = api.home
    with home.runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Dataset)) == 0
        assert session.scalar(select(func.count()).select_from(DatasetVersion)) == 0
    assert list(home.settings.data_dir.iterdir()) == []
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith("sbx-upload-")]
    spool = home.settings.effective_upload_spool_dir  # the encrypted upload spool
    assert not spool.is_dir() or list(spool.iterdir()) == []


def test_bad_csv_names_row_and_column_and_stores_nothing(api: Api, demo_files) -> None:
    data, schema = demo_files
    frame = pl.read_parquet(data).head(50)
    csv = frame.write_csv().splitlines()
    columns = csv[0].split(",")
    bad = csv[31].split(",")
    bad[columns.index("employees")] = "many"
    csv[31] = ",".join(bad)
    response = _upload(api, schema.read_text(), "bad.csv", "\n".join(csv).encode())
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "row 31" in detail and "employees" in detail
    _nothing_stored(api)


def test_ragged_nul_and_bom_are_refused(api: Api, demo_files) -> None:
    data, schema = demo_files
    csv = pl.read_parquet(data).head(20).write_csv()
    for payload in (csv.replace("\n", ",extra\n", 3).encode(), csv.encode()[:200] + b"\0",
                    b"\xef\xbb\xbf" + csv.encode()):
        response = _upload(api, schema.read_text(), "x.csv", payload)
        assert response.status_code == 422, response.text
    _nothing_stored(api)


def test_unsafe_column_names_are_refused(api: Api, demo_files) -> None:
    data, schema = demo_files
    for bad_name in ("../etc", "city\u202e", "ci\u0000ty"):
        text = schema.read_text().replace("name: city", f"name: {bad_name!r}", 1)
        response = _upload(api, text, "d.parquet", data.read_bytes())
        assert response.status_code == 422, (bad_name, response.text)
    _nothing_stored(api)


def test_upload_over_the_cap_is_413(api: Api, demo_files) -> None:
    data, schema = demo_files
    api.home.runtime.settings.max_upload_bytes = 10_000
    response = _upload(api, schema.read_text(), "d.parquet", data.read_bytes())
    assert response.status_code == 413
    _nothing_stored(api)


def test_corrupt_parquet_is_refused(api: Api, demo_files) -> None:
    data, schema = demo_files
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64
    response = _upload(api, schema.read_text(), "d.parquet", bytes(raw))
    assert response.status_code == 422
    _nothing_stored(api)


def test_mock_download_follows_schema_not_data(ready: Api, demo_files, tmp_path: Path) -> None:
    data, schema_path = demo_files
    schema = DatasetSchema.load(schema_path)
    response = ready.as_("analyst").get("/v1/datasets/enterprises/mock",
                                        params={"format": "parquet", "rows": 500, "seed": 3})
    assert response.status_code == 200
    mock_path = tmp_path / "mock.parquet"
    mock_path.write_bytes(response.content)
    table = read_validated(mock_path, schema)
    assert set(table.column("city").to_pylist()) == set(schema.column("city").categories or [])
    real_ids = set(pq.read_table(data, columns=["enterprise_id"]).column(0).to_pylist())
    assert not real_ids & set(table.column("enterprise_id").to_pylist())
    again = ready.as_("analyst").get("/v1/datasets/enterprises/mock",
                                     params={"format": "parquet", "rows": 500, "seed": 3})
    assert again.content == response.content
    csv = ready.as_("analyst").get("/v1/datasets/enterprises/mock")
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert len(pl.read_csv(io.BytesIO(csv.content))) >= 1000


def test_tampered_store_fails_before_any_charge(ready: Api) -> None:
    home = ready.home
    with home.runtime.db.transaction() as session:
        version = session.scalar(select(DatasetVersion))
        assert version is not None
    stored = home.settings.data_dir / version.storage_file
    raw = bytearray(stored.read_bytes())
    raw[-100] ^= 0x01
    stored.write_bytes(bytes(raw))
    job = ready.as_("analyst").post("/v1/jobs", json={"query": QUERY}).json()
    home.worker().run_once()
    status = ready.as_("analyst").get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "failed" and "integrity" in status["error"]
    assert ready.as_("analyst").get("/v1/budget/enterprises").json()["spent"] == 0


def test_catalog_hides_exact_row_count_from_analysts(ready: Api) -> None:
    analyst_view = ready.as_("analyst").get("/v1/datasets/enterprises").json()
    owner_view = ready.as_("owner").get("/v1/datasets/enterprises").json()
    assert analyst_view["versions"][0]["row_count"] is None
    assert owner_view["versions"][0]["row_count"] == 20_000
    assert analyst_view["schema"]["max_rows"] >= 20_000
