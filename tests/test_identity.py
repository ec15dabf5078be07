"""Tokens: random, stored hashed, expiring, revocable; disabled users are refused."""

from __future__ import annotations

from datetime import timedelta

from conftest import Api, Home
from sqlalchemy import select

from sandbox.db.models import ApiToken, User, utcnow
from sandbox.identity.service import authenticate, hash_token


def test_tokens_are_stored_hashed(home: Home) -> None:
    token = home.tokens["analyst"]
    with home.runtime.db.transaction() as session:
        hashes = list(session.scalars(select(ApiToken.token_hash)))
        assert hash_token(token) in hashes and token not in hashes
        principal = authenticate(session, token)
        assert principal is not None and principal.role == "analyst"


def test_expired_revoked_and_disabled_are_refused(api: Api) -> None:
    home = api.home
    client = api.as_("analyst")
    assert client.get("/v1/datasets").status_code == 200
    with home.runtime.db.transaction() as session:
        row = session.scalar(select(ApiToken).where(
            ApiToken.token_hash == hash_token(home.tokens["analyst"])))
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    assert client.get("/v1/datasets").status_code == 401
    owner = api.as_("owner")
    with home.runtime.db.transaction() as session:
        row = session.scalar(select(ApiToken).where(
            ApiToken.token_hash == hash_token(home.tokens["owner"])))
        assert row is not None
        row.revoked_at = utcnow()
    assert owner.get("/v1/datasets").status_code == 401
    reviewer = api.as_("reviewer")
    with home.runtime.db.transaction() as session:
        user = session.scalar(select(User).where(User.name == "reviewer-chen"))
        assert user is not None
        user.disabled_at = utcnow()
    assert reviewer.get("/v1/datasets").status_code == 401


def test_key_file_and_tokens_file_are_private(home: Home) -> None:
    keys = list(home.settings.keys_dir.glob("master-*.key"))
    assert len(keys) == 1 and keys[0].stat().st_mode & 0o777 == 0o600
    assert home.settings.keys_dir.stat().st_mode & 0o777 == 0o700
    assert (home.settings.home / "tokens.json").stat().st_mode & 0o777 == 0o600


def test_cli_revokes_tokens(api: Api) -> None:
    import os
    import subprocess
    import sys
    client = api.as_("analyst")
    assert client.get("/v1/datasets").status_code == 200
    env = {**os.environ, "SANDBOX_HOME": str(api.home.settings.home)}
    done = subprocess.run([sys.executable, "-m", "sandbox.cli.main", "user", "revoke",
                           "analyst-wang"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "revoked 1 token" in done.stdout
    assert client.get("/v1/datasets").status_code == 401
