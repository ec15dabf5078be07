"""What every process needs at start-up: settings, the migrated database, the key provider.

``Runtime.open(settings)`` refuses to start without an initialised home (``sandbox init``):
no key file, no service (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.config import Settings
from sandbox.datasets.keys import KeyProvider, LocalKeyFileProvider
from sandbox.db import Database
from sandbox.errors import Conflict


class NotInitialised(Conflict):
    """The home directory has no master key or database yet."""


@dataclass
class Runtime:
    settings: Settings
    db: Database
    keys: KeyProvider

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        if not settings.master_key_path.exists():
            raise NotInitialised(f"no master key at {settings.master_key_path}; run "
                                 "'sandbox init' first")
        db = Database(settings.effective_database_url)
        db.migrate()
        return cls(settings=settings, db=db, keys=LocalKeyFileProvider(settings.master_key_path))

    def close(self) -> None:
        self.db.dispose()
