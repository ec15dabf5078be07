"""Key rotation and dataset deletion (crypto-shredding).

Rotation creates a new master key and rewraps every live data key under it in one
transaction, without re-encrypting any data; old master keys can then be retired once
nothing refers to them.

Deletion destroys the wrapped data keys of every version in the same transaction that
marks the dataset deleted, then removes the ciphertext files. Copies of a wrapped key
that may survive elsewhere (a database backup, free pages, a WAL frame) are useless
without the master key that wrapped it, so rotating with ``retire_old`` after a deletion
completes the shredding. SQLite runs with ``secure_delete`` so freed pages are zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from sandbox.audit import record
from sandbox.datasets.catalog import KEYRING_LOCK, key_context, unwrap_data_key
from sandbox.datasets.keyring import Keyring
from sandbox.db import Database, hold_lock
from sandbox.db.models import Dataset, DatasetVersion, utcnow


@dataclass(frozen=True)
class Rotation:
    new_key_id: str
    rewrapped: int
    retired: tuple[str, ...]


def rotate_master_key(db: Database, keys: Keyring, *, retire_old: bool,
                      actor_id: str | None = None) -> Rotation:
    """Create a new master key, rewrap every data key under it, optionally retire old keys.

    Safe beside registrations and other rotations in other processes: the new key is
    created and everything rewrapped under it inside one transaction holding
    :data:`~sandbox.datasets.catalog.KEYRING_LOCK`, so the new key is the current one for
    the whole transaction; a version registered before it is rewrapped, one registered
    after it is wrapped under this key or a newer one. (If the transaction fails, the new
    key stays as an unused current key; the next rotation or retirement deals with it.)"""
    with db.transaction() as session:
        hold_lock(session, KEYRING_LOCK)
        new = keys.create_next()
        versions = list(session.scalars(select(DatasetVersion).where(
            DatasetVersion.wrapped_key.is_not(None), DatasetVersion.key_id != new.key_id)))
        for version in versions:
            data_key = unwrap_data_key(version, keys)
            version.wrapped_key = new.wrap(data_key, context=key_context(version.dataset_id,
                                                                         version.version))
            version.key_id = new.key_id
        record(session, actor_id=actor_id, action="keys.rotated", object_type="master_key",
               object_id=new.key_id, detail={"rewrapped": len(versions)})
    retired: list[str] = []
    if retire_old:
        retired = retire_unused(db, keys, actor_id=actor_id)
    return Rotation(new.key_id, len(versions), tuple(retired))


def retire_unused(db: Database, keys: Keyring, *, actor_id: str | None = None) -> list[str]:
    """Destroy every master key but the current one that no live data key refers to.

    Keys in use are read with :data:`~sandbox.datasets.catalog.KEYRING_LOCK` held, and a
    registration wraps under the key current when it holds that lock, never an older
    one; so no version can come to need a key retired here."""
    with db.transaction() as session:
        hold_lock(session, KEYRING_LOCK)
        current = keys.current().key_id
        in_use = set(session.scalars(select(DatasetVersion.key_id).where(
            DatasetVersion.wrapped_key.is_not(None))))
        retired = [k for k in keys.key_ids() if k != current and k not in in_use]
        for key_id in retired:
            record(session, actor_id=actor_id, action="keys.retired", object_type="master_key",
                   object_id=key_id)
    for key_id in retired:  # after the commit: a crash leaves an unused key, never a lost one
        keys.retire(key_id)
    return retired


def delete_dataset(db: Database, dataset_id: str, *, data_dir: Path,
                   actor_id: str | None) -> int:
    """Shred every version of a dataset; returns the number of versions destroyed."""
    with db.transaction() as session:
        dataset = session.get(Dataset, dataset_id)
        assert dataset is not None
        versions = list(session.scalars(select(DatasetVersion)
                                        .where(DatasetVersion.dataset_id == dataset_id)))
        original = dataset.name
        for version in versions:
            version.wrapped_key = None
        dataset.deleted_at = utcnow()
        dataset.name = f"{original}~deleted~{dataset.id[:8]}"  # frees the name for reuse
        record(session, actor_id=actor_id, action="dataset.deleted", object_type="dataset",
               object_id=dataset.id, detail={"name": original, "versions": len(versions)})
        files = [data_dir / v.storage_file for v in versions]
    for path in files:
        path.unlink(missing_ok=True)
    db.checkpoint()  # push the zeroed pages out of the WAL into the database file
    return len(versions)

