"""``sandbox init``: create the home directory, master key, database, admin and demo roles."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sandbox.config import Settings
from sandbox.db import Database
from sandbox.errors import Conflict
from sandbox.identity.service import Role, create_organisation, create_user, issue_token
from sandbox.runtime import open_keyring

#: The demo's people: (role, user name, organisation).
DEMO_ROLES: tuple[tuple[Role, str, str], ...] = (
    (Role.ADMIN, "admin", "sandbox-operators"),
    (Role.OWNER, "owner-li", "jiangsu-data-bureau"),
    (Role.ANALYST, "analyst-wang", "suzhou-analytics"),
    (Role.REVIEWER, "reviewer-chen", "provincial-review-office"),
)


@dataclass(frozen=True)
class InitResult:
    home: Path
    tokens_file: Path
    tokens: dict[str, str]


def initialise(settings: Settings) -> InitResult:
    """Create everything ``sandbox serve`` needs; refuses an already initialised home."""
    home = settings.home
    if (home / "tokens.json").exists():
        raise Conflict(f"{home} is already initialised")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring = open_keyring(settings)
    if not keyring.key_ids():
        keyring.create_next()
    db = Database(settings.effective_database_url)
    try:
        db.migrate()
        tokens: dict[str, str] = {}
        created: set[str] = set()
        with db.transaction() as session:
            for role, user_name, org_name in DEMO_ROLES:
                if org_name not in created:
                    create_organisation(session, org_name, actor_id=None)
                    created.add(org_name)
                user = create_user(session, user_name, org_name=org_name, role=role,
                                   actor_id=None)
                tokens[role.value] = issue_token(session, user, actor_id=None)
    finally:
        db.dispose()
    tokens_file = home / "tokens.json"
    fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(tokens, handle, indent=2)
    return InitResult(home=home, tokens_file=tokens_file, tokens=tokens)


def load_tokens(settings: Settings) -> dict[str, str]:
    path = settings.home / "tokens.json"
    if not path.exists():
        raise Conflict(f"no tokens at {path}; run 'sandbox init' first")
    tokens: dict[str, str] = json.loads(path.read_text())
    return tokens
