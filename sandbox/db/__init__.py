"""The metadata database: models, engines, transactions, migrations."""

from sandbox.db.session import Database

__all__ = ["Database"]
