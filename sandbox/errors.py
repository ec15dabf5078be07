"""Error families every part raises and the API maps to HTTP status codes.

Messages are shown to callers, so they may depend only on public things (schema,
policy, budget, the request itself) and never carry secrets.
"""


class SandboxError(Exception):
    """Base of the errors a caller may see."""

    status_code = 400


class NotFound(SandboxError):
    """Missing, or not visible to the caller: the two are indistinguishable (404)."""

    status_code = 404


class Forbidden(SandboxError):
    """The caller may see the object but not do this (403, audited)."""

    status_code = 403


class Invalid(SandboxError):
    """The request is malformed or refused by schema or policy (422)."""

    status_code = 422


class Conflict(SandboxError):
    """The request does not fit the current state: no approved policy, budget spent (409)."""

    status_code = 409
