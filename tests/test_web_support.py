"""Helpers for the web page tests (no tests here): signing in through the real form,
reading a page's CSRF token, adding people, and reaching job states through the real
API and worker."""

from __future__ import annotations

import re

from conftest import QUERY, Api
from fastapi.testclient import TestClient

from sandbox.identity.service import (
    IdentityError,
    Role,
    create_organisation,
    create_user,
    get_organisation,
    issue_token,
)

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
LOGIN = re.compile(r'name="login_token" value="([^"]+)"')


def login_form(client: TestClient) -> str:
    """Open the sign-in form; its form token (the nonce cookie is kept by the client)."""
    page = client.get("/ui/login")
    assert page.status_code == 200, page.text
    match = LOGIN.search(page.text)
    assert match, page.text
    return match.group(1)


def sign_in(api: Api, token: str) -> TestClient:
    """A fresh client signed in to the pages with ``token`` through the sign-in form."""
    client = TestClient(api.app)
    response = client.post("/ui/login", data={"token": token, "login_token": login_form(client),
                                              "next": "/ui/"}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return client


def csrf(client: TestClient, path: str = "/ui/") -> str:
    """The CSRF token on the page at ``path`` (the one its forms carry)."""
    page = client.get(path)
    match = CSRF.search(page.text)
    assert match, (page.status_code, page.text[:500])
    return match.group(1)


def add_user(api: Api, name: str, org: str, role: Role) -> str:
    """A user in ``org`` (created if new) with ``role``; returns a fresh token."""
    with api.home.runtime.db.transaction() as session:
        try:
            get_organisation(session, org)
        except IdentityError:
            create_organisation(session, org, actor_id=None)
        user = create_user(session, name, org_name=org, role=role, actor_id=None)
        return issue_token(session, user, actor_id=None)


def pending_job(api: Api, query: dict | None = None) -> str:
    """A query job submitted by the analyst and run by the worker: pending review."""
    response = api.as_("analyst").post("/v1/jobs", json={"query": query or QUERY})
    assert response.status_code == 201, response.text
    assert api.home.worker().run_once()
    job_id: str = response.json()["id"]
    assert api.as_("analyst").get(f"/v1/jobs/{job_id}").json()["status"] == "pending_review"
    return job_id
