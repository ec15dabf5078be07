"""Registering datasets and giving the broker their plaintext, in RAM only.

``register`` streams the owner's file through validation into the encrypted store under
a fresh data key wrapped by the master key, then records the version, its budget account
and audit events in one transaction; the encrypted file is removed again if anything
fails, so nothing is half-stored.

``unwrap_data_key`` gives the broker a version's data key, or an error naming the
dataset; decryption and the RAM-only plaintext live in ``store`` and ``cache``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sandbox.audit import record
from sandbox.datasets import store
from sandbox.datasets.ingest import iter_validated_batches
from sandbox.datasets.keyring import Keyring
from sandbox.datasets.keys import KeyUnavailable, new_data_key
from sandbox.datasets.schema import DatasetSchema
from sandbox.db import Database, hold_lock
from sandbox.db.models import Dataset, DatasetVersion, new_id
from sandbox.errors import Conflict, NotFound
from sandbox.identity.service import Principal
from sandbox.privacy import ledger

#: A file may decode to at most this many times its size (decompression bombs).
PLAINTEXT_EXPANSION = 20

#: Held by every transaction that wraps data keys or decides which master keys are in
#: use (registration, rotation, retirement): see :func:`register`.
KEYRING_LOCK = "sandbox.keyring"


def key_context(dataset_id: str, version: int) -> bytes:
    """Associated data binding a wrapped data key to its dataset version."""
    return f"sandbox-data-key:{dataset_id}:{version}".encode()


def register(db: Database, *, principal: Principal, schema: DatasetSchema, source: Path,
             data_dir: Path, keys: Keyring, max_bytes: int | None = None,
             progress: Callable[[int], None] | None = None) -> str:
    """Register ``source`` as a new dataset, or a new version of the owner's dataset.

    Streams the file through validation into the encrypted store *outside* any database
    transaction (a large ingest must not hold the database lock), then records the
    dataset, version, budget account and audit events in one short transaction. A file
    rejected half-way, or a failed transaction, leaves no file and no rows. Returns the
    dataset id.

    The data key is wrapped inside that transaction, under the master key that is
    current then, with :data:`KEYRING_LOCK` held: a key rotation (with retirement) that
    ran during the ingest cannot leave the new version wrapped under a destroyed key.
    """
    with db.transaction() as session:
        dataset = session.scalar(select(Dataset).where(Dataset.name == schema.name,
                                                       Dataset.deleted_at.is_(None)))
        if dataset is not None and dataset.owner_org_id != principal.org_id:
            raise Conflict(f"dataset name {schema.name!r} is taken by another organisation")
        dataset_id = dataset.id if dataset is not None else new_id()
        version = 1 if dataset is None else (session.scalar(
            select(func.max(DatasetVersion.version))
            .where(DatasetVersion.dataset_id == dataset_id)) or 0) + 1
    data_key = new_data_key()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = data_dir / f"{dataset_id}-v{version}-{secrets.token_hex(4)}.sbxenc"
    info = store.write_encrypted_parquet(
        iter_validated_batches(source, schema, max_bytes=max_bytes, progress=progress,
                               max_plaintext_bytes=None if max_bytes is None
                               else max_bytes * PLAINTEXT_EXPANSION),
        schema.arrow_schema(), target, data_key, dataset_id=dataset_id, version=version)
    try:
        with db.transaction() as session:
            hold_lock(session, KEYRING_LOCK)
            master = keys.current()
            if dataset is None:
                session.add(Dataset(id=dataset_id, name=schema.name, title=schema.title,
                                    description=schema.description,
                                    owner_org_id=principal.org_id,
                                    created_by=principal.user_id))
                session.flush()
                ledger.open_account(session, dataset_id)
                record(session, actor_id=principal.user_id, action="dataset.created",
                       object_type="dataset", object_id=dataset_id,
                       detail={"name": schema.name})
            session.add(DatasetVersion(
                dataset_id=dataset_id, version=version, schema_yaml=schema.to_yaml(),
                storage_file=target.name,
                wrapped_key=master.wrap(data_key, context=key_context(dataset_id, version)),
                key_id=master.key_id, ciphertext_sha256=info.ciphertext_sha256,
                plaintext_bytes=info.plaintext_bytes, row_count=info.row_count))
            session.flush()
            record(session, actor_id=principal.user_id, action="dataset.version_added",
                   object_type="dataset", object_id=dataset_id,
                   detail={"version": version, "sha256": info.ciphertext_sha256})
    except IntegrityError:
        target.unlink(missing_ok=True)
        raise Conflict(f"dataset {schema.name!r} was registered concurrently (version "
                       f"{version}); retry the upload") from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return dataset_id


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


def unwrap_data_key(version: DatasetVersion, keys: Keyring) -> bytes:
    """The version's data key; ``KeyUnavailable`` naming the dataset if it cannot be had."""
    if version.wrapped_key is None:
        raise KeyUnavailable(f"dataset {version.dataset_id} version {version.version}: data "
                             "key destroyed (dataset deleted)")
    try:
        return keys.provider(version.key_id).unwrap(
            version.wrapped_key, context=key_context(version.dataset_id, version.version))
    except KeyUnavailable as exc:
        raise KeyUnavailable(f"dataset {version.dataset_id} version {version.version}: "
                             f"{exc}") from None

