"""The append-only, hash-chained audit log."""

from sandbox.audit.log import AuditVerification, record, verify

__all__ = ["AuditVerification", "record", "verify"]
