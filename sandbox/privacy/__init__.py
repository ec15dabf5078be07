"""Query specs, their validation, the OpenDP engine and the budget ledger."""
