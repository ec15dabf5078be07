"""Registering datasets and giving the broker their plaintext, in RAM only.

``register`` validates the owner's file against the schema, encrypts it under a fresh
data key wrapped by the master key, and records the version, its budget account and an
audit event in one transaction; the encrypted file is written first and removed again if
the transaction fails, so nothing is half-stored.

``plaintext_ipc`` decrypts a version into a 0600 Arrow IPC file inside a private 0700
directory on a RAM-backed filesystem (``/dev/shm`` by default) for OpenDP's lazy scan,
and deletes it when the block ends: plaintext never reaches persistent disk.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sandbox.audit import record
from sandbox.datasets import store
from sandbox.datasets.ingest import read_validated
from sandbox.datasets.keys import KeyProvider, new_data_key
from sandbox.datasets.schema import DatasetSchema
from sandbox.db.models import Dataset, DatasetVersion
from sandbox.errors import Conflict, NotFound
from sandbox.identity.service import Principal
from sandbox.privacy import ledger


def key_context(dataset_id: str, version: int) -> bytes:
    """Associated data binding a wrapped data key to its dataset version."""
    return f"sandbox-data-key:{dataset_id}:{version}".encode()


def register(session: Session, *, principal: Principal, schema: DatasetSchema, source: Path,
             data_dir: Path, keys: KeyProvider, max_bytes: int | None = None) -> DatasetVersion:
    """Register ``source`` as a new dataset, or a new version of the owner's dataset."""
    table = read_validated(source, schema, max_bytes=max_bytes)
    dataset = session.scalar(select(Dataset).where(Dataset.name == schema.name,
                                                   Dataset.deleted_at.is_(None)))
    if dataset is None:
        dataset = Dataset(name=schema.name, title=schema.title, description=schema.description,
                          owner_org_id=principal.org_id, created_by=principal.user_id)
        session.add(dataset)
        session.flush()
        ledger.open_account(session, dataset.id)
        record(session, actor_id=principal.user_id, action="dataset.created",
               object_type="dataset", object_id=dataset.id, detail={"name": schema.name})
    elif dataset.owner_org_id != principal.org_id:
        raise Conflict(f"dataset name {schema.name!r} is taken by another organisation")
    version = (session.scalar(select(func.max(DatasetVersion.version))
                              .where(DatasetVersion.dataset_id == dataset.id)) or 0) + 1
    data_key = new_data_key()
    storage_file = f"{dataset.id}-v{version}-{secrets.token_hex(4)}.sbxenc"
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = data_dir / storage_file
    info = store.encrypt_table(table, target, data_key, dataset_id=dataset.id, version=version)
    try:
        row = DatasetVersion(
            dataset_id=dataset.id, version=version, schema_yaml=schema.to_yaml(),
            storage_file=storage_file,
            wrapped_key=keys.wrap(data_key, context=key_context(dataset.id, version)),
            key_id=keys.key_id, ciphertext_sha256=info.ciphertext_sha256,
            plaintext_bytes=info.plaintext_bytes, row_count=table.num_rows)
        session.add(row)
        session.flush()
        record(session, actor_id=principal.user_id, action="dataset.version_added",
               object_type="dataset", object_id=dataset.id,
               detail={"version": version, "sha256": info.ciphertext_sha256})
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return row


def get_dataset(session: Session, name: str) -> Dataset:
    dataset = session.scalar(select(Dataset).where(Dataset.name == name,
                                                   Dataset.deleted_at.is_(None)))
    if dataset is None:
        raise NotFound(f"dataset {name!r} not found")
    return dataset


def latest_version(session: Session, dataset: Dataset) -> DatasetVersion:
    row = session.scalar(select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id)
                         .order_by(DatasetVersion.version.desc()).limit(1))
    if row is None:
        raise NotFound(f"dataset {dataset.name!r} has no version")
    return row


def schema_of(version: DatasetVersion) -> DatasetSchema:
    return DatasetSchema.from_yaml(version.schema_yaml)


@contextlib.contextmanager
def plaintext_ipc(version: DatasetVersion, *, data_dir: Path, keys: KeyProvider,
                  tmpfs_dir: Path) -> Iterator[Path]:
    """Decrypt ``version`` to a 0600 Arrow IPC file in RAM; removed when the block ends."""
    if version.wrapped_key is None:
        raise NotFound("dataset version has been deleted")
    data_key = keys.unwrap(version.wrapped_key,
                           context=key_context(version.dataset_id, version.version))
    buffer = store.decrypt_to_bytes(data_dir / version.storage_file, data_key,
                                    dataset_id=version.dataset_id, version=version.version)
    directory = Path(tempfile.mkdtemp(prefix="sbx-", dir=tmpfs_dir))  # mode 0700
    path = directory / "data.arrow"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer)
        yield path
    finally:
        _wipe(buffer)
        path.unlink(missing_ok=True)
        directory.rmdir()


def _wipe(buffer: bytearray) -> None:
    """Overwrite a plaintext buffer before it is freed (best effort in Python)."""
    buffer[:] = bytes(len(buffer))
