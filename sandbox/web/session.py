"""Web sessions and CSRF tokens for the pages under ``/ui/``.

Contract:
- Signing in takes the user's API token once and checks it with ``authenticate``; the
  cookie then holds the token's *row id* (never the token) with the user id, a random
  session id and two times, protected by HMAC-SHA256 under a server key
  (``<keys_dir>/web-session.key``, 32 random bytes, mode 0600, created on first use).
- Every request re-checks the token by id (``authenticate_token_id``): a revoked or
  expired token, or a disabled user, ends the session at once, on every replica.
- A session lives at most ``ABSOLUTE_SECONDS`` after sign-in and ``IDLE_SECONDS`` after
  its last request; the cookie is re-issued (sliding) at most once per
  ``REFRESH_SECONDS``. Signing out denies the session id in this process until its
  absolute end (the cookie is also deleted); see docs/reference/web.md for the limits.
- The cookie is ``HttpOnly``, ``SameSite=Strict``, ``Path=/``; in production
  (``SANDBOX_ENVIRONMENT=prod``) it is also ``Secure`` and named with the ``__Host-``
  prefix.
- CSRF: each form carries ``HMAC(csrf key, session id)``; the sign-in form, which has no
  session yet, carries ``HMAC(login key, nonce)`` where the nonce is in a short-lived
  cookie of its own. Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ABSOLUTE_SECONDS = 8 * 3600
IDLE_SECONDS = 30 * 60
REFRESH_SECONDS = 60
LOGIN_FORM_SECONDS = 15 * 60
KEY_FILE = "web-session.key"
_VERSION = "v1"
_MAX_COOKIE = 1024


@dataclass(frozen=True)
class WebSession:
    """What the session cookie says (after its MAC and times were checked)."""

    sid: str
    token_id: str
    user_id: str
    issued: int
    seen: int

    @property
    def reference(self) -> str:
        """A short, non-secret name for the session (for the audit log)."""
        return hashlib.sha256(self.sid.encode()).hexdigest()[:12]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_key(keys_dir: Path) -> bytes:
    """The server's session key, created (0600, exclusively) on first use."""
    path = keys_dir / KEY_FILE
    if not path.exists():
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) < 32:
        raise ValueError(f"{path} is shorter than 32 bytes")
    return key


class SessionKeeper:
    """Issues, checks, refreshes and ends web sessions; derives CSRF tokens."""

    def __init__(self, key: bytes, *, secure: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self._cookie_key = hmac.new(key, b"sandbox-web-cookie", hashlib.sha256).digest()
        self._csrf_key = hmac.new(key, b"sandbox-web-csrf", hashlib.sha256).digest()
        self._login_key = hmac.new(key, b"sandbox-web-login", hashlib.sha256).digest()
        self.secure = secure
        self.clock = clock
        self._ended: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def cookie_name(self) -> str:
        return "__Host-sandbox_ui" if self.secure else "sandbox_ui"

    @property
    def login_cookie_name(self) -> str:
        return "__Host-sandbox_ui_login" if self.secure else "sandbox_ui_login"

    def cookie_options(self, max_age: int) -> dict[str, Any]:
        """Keyword arguments for ``Response.set_cookie``."""
        return {"max_age": max_age, "path": "/", "httponly": True, "samesite": "strict",
                "secure": self.secure}

    def _now(self) -> int:
        return int(self.clock())

    # -- sessions -------------------------------------------------------------------

    def issue(self, *, token_id: str, user_id: str) -> WebSession:
        now = self._now()
        return WebSession(secrets.token_hex(16), token_id, user_id, now, now)

    def encode(self, session: WebSession) -> str:
        body = _b64(json.dumps([session.sid, session.token_id, session.user_id,
                                session.issued, session.seen],
                               separators=(",", ":")).encode())
        signed = f"{_VERSION}.{body}"
        mac = hmac.new(self._cookie_key, signed.encode(), hashlib.sha256).digest()
        return f"{signed}.{_b64(mac)}"

    def decode(self, value: str | None) -> WebSession | None:
        """The session a cookie names, or ``None``: bad MAC or format, too old, idle too
        long, or signed out. Does not look at the token (the caller does, every time)."""
        if not value or len(value) > _MAX_COOKIE or value.count(".") != 2:
            return None
        version, body, mac = value.split(".")
        if version != _VERSION:
            return None
        expected = hmac.new(self._cookie_key, f"{version}.{body}".encode(),
                            hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(expected, _unb64(mac)):
                return None
            sid, token_id, user_id, issued, seen = json.loads(_unb64(body))
        except (ValueError, TypeError, binascii.Error):
            return None
        if not (isinstance(sid, str) and isinstance(token_id, str)
                and isinstance(user_id, str) and isinstance(issued, int)
                and isinstance(seen, int)):
            return None
        now = self._now()
        if not (issued <= seen <= now + 5) or now - issued > ABSOLUTE_SECONDS \
                or now - seen > IDLE_SECONDS:
            return None
        with self._lock:
            if sid in self._ended:
                return None
        return WebSession(sid, token_id, user_id, issued, seen)

    def refreshed(self, session: WebSession) -> WebSession | None:
        """The session with ``seen`` moved to now, when a refresh is due; else ``None``."""
        now = self._now()
        if now - session.seen < REFRESH_SECONDS:
            return None
        return replace(session, seen=now)

    def remaining(self, session: WebSession) -> int:
        """Seconds the cookie should live: the idle window, capped by the absolute end."""
        return max(0, min(IDLE_SECONDS, session.issued + ABSOLUTE_SECONDS - self._now()))

    def end(self, session: WebSession) -> None:
        """Deny this session id (in this process) until it would have expired anyway."""
        now = self._now()
        with self._lock:
            self._ended = {sid: until for sid, until in self._ended.items() if until > now}
            self._ended[session.sid] = session.issued + ABSOLUTE_SECONDS

    # -- CSRF -----------------------------------------------------------------------

    def csrf_token(self, session: WebSession) -> str:
        return _b64(hmac.new(self._csrf_key, session.sid.encode(), hashlib.sha256).digest())

    def check_csrf(self, session: WebSession, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session).encode(),
                                                   str(token).encode())

    def login_nonce(self) -> tuple[str, str]:
        """A fresh (cookie nonce, form token) pair for the sign-in form."""
        nonce = f"{self._now()}.{secrets.token_hex(16)}"
        return nonce, self._login_token(nonce)

    def _login_token(self, nonce: str) -> str:
        return _b64(hmac.new(self._login_key, nonce.encode(), hashlib.sha256).digest())

    def check_login(self, nonce: str | None, token: str | None) -> bool:
        """The sign-in form's token matches its cookie and the form is not stale."""
        if not nonce or not token or len(nonce) > 100:
            return False
        issued = nonce.split(".", 1)[0]
        if not issued.isdigit() or self._now() - int(issued) > LOGIN_FORM_SECONDS:
            return False
        return hmac.compare_digest(self._login_token(nonce).encode(), str(token).encode())
