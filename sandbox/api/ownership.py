"""The one ownership check for owner actions on a dataset and everything under it."""

from __future__ import annotations

from sandbox.api.deps import require_role
from sandbox.db.models import Dataset
from sandbox.errors import Forbidden
from sandbox.identity.service import Principal, Role


def check_dataset_owner(principal: Principal, dataset: Dataset) -> None:
    """403 unless the caller is an owner in the dataset's organisation."""
    require_role(principal, Role.OWNER)
    if dataset.owner_org_id != principal.org_id:
        raise Forbidden(f"dataset {dataset.name!r} belongs to another organisation")
