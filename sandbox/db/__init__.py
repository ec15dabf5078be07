"""The metadata database: models, engines, transactions, migrations."""

from sandbox.db.session import Database, hold_lock

__all__ = ["Database", "hold_lock"]
