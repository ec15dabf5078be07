"""Datasets: register (owner), catalog and detail (everyone signed in). Never rows."""

from __future__ import annotations

import logging
import threading
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from sandbox.api.deps import PrincipalDep, RuntimeDep, require_role
from sandbox.api.ownership import (
    can_own_dataset,
    check_dataset_owner,
    owned_dataset,
    owned_jobs_query,
)
from sandbox.api.uploads import (
    MAX_FIELD_BYTES,
    FormSpec,
    UploadLimits,
    no_space,
    receive_multipart,
    run_to_end,
)
from sandbox.datasets import catalog, lifecycle, mock
from sandbox.datasets.schema import DatasetSchema
from sandbox.datasets.spool import SpoolIntegrityError
from sandbox.db.models import Dataset, DatasetVersion, Job, Organisation
from sandbox.errors import Invalid
from sandbox.identity.service import Principal, Role
from sandbox.jobs.summary import job_rows
from sandbox.runtime import Runtime

log = logging.getLogger("sandbox.api.datasets")


router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_FORMATS = {"csv": ".csv", "parquet": ".parquet", "pq": ".parquet"}
#: The parts of a registration form; the schema and the format share the 1 MiB of fields.
DATASET_FORM = FormSpec(fields={"schema": MAX_FIELD_BYTES, "format": 64},
                        files=frozenset({"data"}))


@router.post("", status_code=201, summary="Register a dataset (or a new version of one)")
async def register_dataset(request: Request, runtime: RuntimeDep,
                           principal: PrincipalDep) -> dict[str, Any]:
    """Multipart form: ``schema`` (YAML text) and ``data`` (a CSV or Parquet file),
    optionally ``format`` (``csv`` or ``parquet``; otherwise taken from the file name).
    Any other part, or one sent twice, is refused (400).

    The file is spooled to disk encrypted under a key held only in memory, then
    validated and stored; the spool is removed in every case, and only after ingest has
    ended (a cancelled request stops ingest at its next piece and waits for it). Upload
    limits (413, 408, 503, 507) are those of
    :func:`~sandbox.api.uploads.receive_multipart`."""
    require_role(principal, Role.OWNER)
    settings = runtime.settings
    async with receive_multipart(request, spool_root=settings.effective_upload_spool_dir,
                                 limits=UploadLimits.from_settings(settings),
                                 form=DATASET_FORM, owner=principal.org_id) as upload:
        if "schema" not in upload.fields or "data" not in upload.files:
            raise HTTPException(422, "the form needs a 'schema' field and a 'data' file")
        schema = DatasetSchema.from_yaml(upload.fields["schema"].decode("utf-8", "replace"))
        fmt = upload.fields.get("format", b"").decode("utf-8", "replace") or \
            upload.filenames["data"].rsplit(".", 1)[-1].lower()
        if fmt not in _FORMATS:
            raise HTTPException(422, "format: give 'csv' or 'parquet' (or a file name ending "
                                     "in .csv or .parquet)")
        source = upload.files["data"].with_suffix(_FORMATS[fmt])
        return await run_to_end(partial(_register, runtime, principal, schema, source))


class RegistrationCancelled(Exception):
    """The request that started an ingest was cancelled; the ingest gives up."""


def _register(runtime: Runtime, principal: Principal, schema: DatasetSchema,
              source: Path, stop: threading.Event) -> dict[str, Any]:
    """Validate and store ``source`` (runs in a worker thread); gives up, storing
    nothing, at the next piece read once ``stop`` is set."""
    def check(_: int) -> None:
        if stop.is_set():
            raise RegistrationCancelled("the upload request was cancelled; nothing was stored")

    with runtime.db.transaction() as session:
        org = session.get(Organisation, principal.org_id)
        if org is None or schema.owner_organisation != org.name:
            raise Invalid(f"schema.owner_organisation: must be your organisation "
                          f"{org.name if org else '?'!r}")
    try:
        dataset_id = catalog.register(runtime.db, principal=principal, schema=schema,
                                      source=source, data_dir=runtime.settings.data_dir,
                                      keys=runtime.keys,
                                      max_bytes=runtime.settings.max_upload_bytes,
                                      progress=check)
    except SpoolIntegrityError as exc:  # changed on disk while the request ran
        log.error("%s", exc)
        raise HTTPException(500, f"{exc}; nothing was stored, upload again") from None
    except OSError as exc:
        if not no_space(exc):
            raise
        log.warning("dataset store write failed: %s (%s)", exc.strerror, exc.filename or "")
        raise HTTPException(507, "no space left on the server to store the dataset; "
                                 "nothing was stored, retry later or ask the administrator "
                                 "to free space in the data directory") from None
    with runtime.db.transaction() as session:
        dataset = session.get(Dataset, dataset_id)
        assert dataset is not None
        return dataset_view(session, dataset, principal)


@router.delete("/{name}", summary="Delete a dataset: its data keys are destroyed (owner)")
def delete_dataset(name: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.transaction() as session:
        dataset = catalog.get_dataset(session, name)
        check_dataset_owner(principal, dataset)
        dataset_id = dataset.id
    destroyed = lifecycle.delete_dataset(runtime.db, dataset_id, actor_id=principal.user_id,
                                         data_dir=runtime.settings.data_dir)
    return {"name": name, "deleted": True, "versions_shredded": destroyed}


@router.get("/{name}/mock", summary="Mock data generated from the schema alone (no real rows)",
            response_class=Response,
            responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}})
def mock_data(name: str, runtime: RuntimeDep, principal: PrincipalDep,
              format: Annotated[Literal["csv", "parquet"], Query()] = "csv",
              rows: Annotated[int, Query(ge=1, le=100_000)] = 1000,
              seed: Annotated[int, Query(ge=0, le=2**31)] = 0) -> Response:
    with runtime.db.read() as session:
        schema = catalog.schema_of(catalog.latest_version(session, catalog.get_dataset(session,
                                                                                        name)))
    table = mock.generate_mock(schema, rows, seed)
    if format == "csv":
        return Response(mock.mock_csv_bytes(table), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}-mock.csv"'})
    return Response(mock.mock_parquet_bytes(table), media_type="application/vnd.apache.parquet",
                    headers={"Content-Disposition":
                             f'attachment; filename="{name}-mock.parquet"'})


@router.get("", summary="The catalog: every dataset's metadata")
def list_datasets(runtime: RuntimeDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    with runtime.db.read() as session:
        rows = session.scalars(select(Dataset).where(Dataset.deleted_at.is_(None))
                               .order_by(Dataset.name))
        return [dataset_view(session, d, principal) for d in rows]


@router.get("/{name}", summary="One dataset's metadata, schema and versions")
def get_dataset(name: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.read() as session:
        return dataset_view(session, catalog.get_dataset(session, name), principal)


@router.get("/{name}/jobs", summary="Jobs on a dataset you own: state, kind, cost and the "
                                    "asking organisation, newest first; never outputs (owner)")
def dataset_jobs(name: str, runtime: RuntimeDep, principal: PrincipalDep,
                 limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[dict[str, Any]]:
    require_role(principal, Role.OWNER)
    with runtime.db.read() as session:
        dataset = owned_dataset(session, principal, name)  # 404 for other organisations
        rows = list(session.scalars(owned_jobs_query(principal)
                                    .where(Job.dataset_id == dataset.id)
                                    .order_by(Job.created_at.desc()).limit(limit)))
        return [{**row, "created_at": row["created_at"].isoformat(),
                 "finished_at": row["finished_at"].isoformat() if row["finished_at"] else None}
                for row in job_rows(session, rows)]


def dataset_view(session: Session, dataset: Dataset, principal: Principal) -> dict[str, Any]:
    """Metadata only. A version's exact row count shows only to the owner, or when that
    version's own schema marks it public (marking a new version public does not reveal
    the counts of earlier versions)."""
    versions = list(session.scalars(select(DatasetVersion)
                                    .where(DatasetVersion.dataset_id == dataset.id)
                                    .order_by(DatasetVersion.version)))
    latest = catalog.schema_of(versions[-1]) if versions else None
    owner = session.get(Organisation, dataset.owner_org_id)
    is_owner = can_own_dataset(principal, dataset)
    return {
        "name": dataset.name,
        "title": dataset.title,
        "description": dataset.description,
        "owner_organisation": owner.name if owner else None,
        "schema": latest.model_dump(mode="json") if latest else None,
        "versions": [
            {"version": v.version, "created_at": v.created_at.isoformat(),
             "row_count": v.row_count if (is_owner or catalog.schema_of(v).row_count_public)
             else None}
            for v in versions
        ],
    }
