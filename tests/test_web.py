"""The web pages' session, CSRF, headers and visibility, through the real app:
sign-in and sign-out, cookie flags, revoked tokens, timeouts, CSRF refusals, security
headers, 404 for other owners' objects, role gates."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import Api, make_home
from fastapi.testclient import TestClient
from sqlalchemy import select
from test_web_support import add_user, csrf, login_form, pending_job, sign_in

from sandbox.db.models import ApiToken, AuditEvent, Job, User, utcnow
from sandbox.identity.service import Role, hash_token
from sandbox.web import session as web_session

PAGES = ["/ui/", "/ui/datasets", "/ui/datasets/enterprises", "/ui/jobs", "/ui/reviews",
         "/ui/audit"]


def _actions(api: Api) -> list[str]:
    with api.home.runtime.db.transaction() as session:
        return list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))


def _cookie_header(response) -> str:
    return "; ".join(v for k, v in response.headers.multi_items() if k == "set-cookie")


def test_sign_in_sets_a_safe_cookie_without_the_token(api: Api) -> None:
    client = TestClient(api.app)
    response = client.post("/ui/login", data={
        "token": api.home.tokens["owner"], "login_token": login_form(client), "next": "/ui/"},
        follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/"
    cookie = next(v for k, v in response.headers.multi_items()
                  if k == "set-cookie" and v.startswith("sandbox_ui="))
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags  # dev; prod below
    max_age = int(re.search(r"max-age=(\d+)", flags).group(1))
    assert 0 < max_age <= web_session.IDLE_SECONDS
    value = cookie.split(";")[0].split("=", 1)[1]
    token = api.home.tokens["owner"]
    assert token not in value and hash_token(token) not in value
    assert "owner-li" in client.get("/ui/").text
    assert "web.signed_in" in _actions(api)


def test_prod_cookie_is_secure_and_host_prefixed(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    try:
        home.runtime.settings = home.runtime.settings.model_copy(
            update={"environment": "prod"})
        prod = Api(home)
        client = TestClient(prod.app)
        form = client.get("/ui/login")
        assert "__Host-sandbox_ui_login=" in _cookie_header(form)
        nonce = client.cookies.get("__Host-sandbox_ui_login")
        token = re.search(r'name="login_token" value="([^"]+)"', form.text).group(1)
        response = client.post("/ui/login", data={"token": home.tokens["owner"],
                                                  "login_token": token},
                               cookies={"__Host-sandbox_ui_login": nonce or ""},
                               follow_redirects=False)
        assert response.status_code == 303
        cookie = next(v for k, v in response.headers.multi_items()
                      if k == "set-cookie" and v.startswith("__Host-sandbox_ui="))
        assert "secure" in cookie.lower() and "httponly" in cookie.lower()
        assert "path=/" in cookie.lower() and "domain" not in cookie.lower()
    finally:
        home.runtime.close()


def test_bad_tokens_and_forged_sign_in_forms_are_refused(api: Api) -> None:
    client = TestClient(api.app)
    bad = client.post("/ui/login", data={"token": "sbx_nope", "login_token": login_form(client)},
                      follow_redirects=False)
    assert bad.status_code == 401 and "invalid, expired or revoked" in bad.text
    assert "sbx_nope" not in bad.text  # the token is never echoed
    assert "sandbox_ui=" not in _cookie_header(bad).replace("sandbox_ui_login=", "")
    fresh = TestClient(api.app)  # no nonce cookie: a cross-site (login CSRF) post
    forged = fresh.post("/ui/login", data={"token": api.home.tokens["owner"],
                                           "login_token": "x"}, follow_redirects=False)
    assert forged.status_code == 400 and "expired or did not come from this site" in forged.text
    other = TestClient(api.app)
    stolen = login_form(other)  # a valid form token, but for another browser's nonce
    login_form(fresh)
    assert fresh.post("/ui/login", data={"token": api.home.tokens["owner"],
                                         "login_token": stolen},
                      follow_redirects=False).status_code == 400
    cross = fresh.post("/ui/login", data={"token": api.home.tokens["owner"],
                                          "login_token": login_form(fresh)},
                       headers={"Sec-Fetch-Site": "cross-site"}, follow_redirects=False)
    assert cross.status_code == 400


def test_pages_need_a_session(ready: Api) -> None:
    client = TestClient(ready.app)
    for path in PAGES[1:]:
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"] == f"/ui/login?next={path}"
    client.cookies.set("sandbox_ui", "v1.e30.AAAA")
    response = client.get("/ui/datasets", follow_redirects=False)
    assert response.headers["location"] == "/ui/login?next=/ui/datasets&ended=1"
    signed = sign_in(ready, ready.home.tokens["owner"])
    value = signed.cookies.get("sandbox_ui")
    tampered = value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]
    client.cookies.set("sandbox_ui", tampered)
    assert client.get("/ui/datasets", follow_redirects=False).status_code == 303
    assert client.post("/ui/logout", follow_redirects=False).status_code == 303


def test_next_page_is_kept_but_never_offsite(ready: Api) -> None:
    for target, expected in [("/ui/datasets/enterprises", "/ui/datasets/enterprises"),
                             ("https://evil.example/", "/ui/"), ("//evil.example/", "/ui/"),
                             ("/ui/\\evil", "/ui/"), ("/v1/datasets", "/ui/")]:
        client = TestClient(ready.app)
        response = client.post("/ui/login", data={
            "token": ready.home.tokens["owner"], "login_token": login_form(client),
            "next": target}, follow_redirects=False)
        assert response.headers["location"] == expected, target


def test_sign_out_ends_the_session(ready: Api) -> None:
    client = sign_in(ready, ready.home.tokens["owner"])
    old = client.cookies.get("sandbox_ui")
    refused = client.post("/ui/logout", data={"csrf_token": "forged"}, follow_redirects=False)
    assert refused.status_code == 403
    response = client.post("/ui/logout", data={"csrf_token": csrf(client)},
                           follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/login"
    assert 'sandbox_ui=""' in _cookie_header(response)
    replay = TestClient(ready.app)
    replay.cookies.set("sandbox_ui", old)
    assert replay.get("/ui/datasets", follow_redirects=False).status_code == 303
    assert "web.signed_out" in _actions(ready)


def test_revoked_token_and_disabled_user_lose_their_sessions(ready: Api) -> None:
    owner = sign_in(ready, ready.home.tokens["owner"])
    reviewer = sign_in(ready, ready.home.tokens["reviewer"])
    assert owner.get("/ui/datasets", follow_redirects=False).status_code == 200
    with ready.home.runtime.db.transaction() as session:  # as `sandbox user revoke` does
        row = session.scalar(select(ApiToken).where(
            ApiToken.token_hash == hash_token(ready.home.tokens["owner"])))
        row.revoked_at = utcnow()
        user = session.scalar(select(User).where(User.name == "reviewer-chen"))
        user.disabled_at = utcnow()
    for client in (owner, reviewer):
        response = client.get("/ui/", follow_redirects=False)
        assert response.status_code == 303 and "ended=1" in response.headers["location"]
    client = TestClient(ready.app)
    again = client.post("/ui/login", data={"token": ready.home.tokens["owner"],
                                           "login_token": login_form(client)})
    assert again.status_code == 401


def test_sessions_time_out(ready: Api) -> None:
    keeper = ready.app.state.web_sessions
    now = [1_800_000_000.0]
    keeper.clock = lambda: now[0]
    client = sign_in(ready, ready.home.tokens["owner"])
    now[0] += web_session.IDLE_SECONDS - 10
    response = client.get("/ui/", follow_redirects=False)  # in time: slides the window
    assert response.status_code == 200 and "sandbox_ui=" in _cookie_header(response)
    now[0] += web_session.IDLE_SECONDS - 10
    assert client.get("/ui/", follow_redirects=False).status_code == 200
    now[0] += web_session.IDLE_SECONDS + 1  # idle too long
    assert client.get("/ui/", follow_redirects=False).status_code == 303
    client = sign_in(ready, ready.home.tokens["owner"])
    for _ in range(web_session.ABSOLUTE_SECONDS // (web_session.IDLE_SECONDS - 60)):
        now[0] += web_session.IDLE_SECONDS - 60
        client.get("/ui/", follow_redirects=False)
    now[0] += web_session.IDLE_SECONDS - 60
    assert client.get("/ui/", follow_redirects=False).status_code == 303  # absolute end


def test_state_changing_forms_need_the_csrf_token(ready: Api) -> None:
    job_id = pending_job(ready)
    reviewer = sign_in(ready, ready.home.tokens["reviewer"])
    other = sign_in(ready, ready.home.tokens["reviewer"])
    path = f"/ui/reviews/{job_id}/approve"
    attempts = [({}, {}), ({"csrf_token": "forged"}, {}),
                ({"csrf_token": csrf(other)}, {}),  # another session's token
                ({"csrf_token": csrf(reviewer)}, {"Sec-Fetch-Site": "cross-site"})]
    for data, headers in attempts:
        response = reviewer.post(path, data=data, headers=headers, follow_redirects=False)
        assert response.status_code == 403, data
        assert "CSRF" in response.text
    rejected = reviewer.post(f"/ui/reviews/{job_id}/reject", data={"reason": "x"},
                             follow_redirects=False)
    assert rejected.status_code == 403
    with ready.home.runtime.db.transaction() as session:
        assert session.get(Job, job_id).status == "pending_review"
        forbidden = list(session.scalars(select(AuditEvent).where(
            AuditEvent.action == "access.forbidden")))
    assert len(forbidden) == 5 and all(e.actor_id for e in forbidden)
    assert reviewer.post(path, data={"csrf_token": csrf(reviewer)},
                         follow_redirects=False).status_code == 303


def test_security_headers_on_every_ui_response(ready: Api) -> None:
    client = sign_in(ready, ready.home.tokens["owner"])
    responses = [client.get(p, follow_redirects=False) for p in PAGES]
    responses += [client.get("/ui/no-such-page"), client.get("/ui/static/style.css"),
                  TestClient(ready.app).get("/ui/login"),
                  TestClient(ready.app).get("/ui/datasets", follow_redirects=False)]
    for response in responses:
        headers = response.headers
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "script-src" not in csp  # no script at all
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        if "/static/" not in str(response.url):
            assert headers["cache-control"] == "no-store"
    assert "content-security-policy" not in client.get("/v1/health").headers  # API unchanged


def test_pages_carry_no_script_and_no_inline_style(ready: Api) -> None:
    job_id = pending_job(ready)
    pages = {"owner": [*PAGES[:4], f"/ui/jobs/{job_id}", "/ui/audit",
                       "/ui/datasets/enterprises/policies/1"],
             "reviewer": ["/ui/reviews", f"/ui/reviews/{job_id}", f"/ui/jobs/{job_id}"],
             "admin": ["/ui/audit", "/ui/jobs"], "analyst": ["/ui/", "/ui/jobs"]}
    for role, paths in pages.items():
        client = sign_in(ready, ready.home.tokens[role])
        for path in paths:
            response = client.get(path)
            assert response.status_code == 200, (role, path)
            html = response.text
            assert "<script" not in html.lower() and " style=" not in html.lower(), path
            assert not re.search(r"<[^>]+\son[a-z]+=", html), path


def test_other_owners_objects_are_404(ready: Api) -> None:
    job_id = pending_job(ready)
    token = add_user(ready, "owner-zhang", "zhejiang-data-office", Role.OWNER)
    other = sign_in(ready, token)
    for path in ["/ui/datasets/enterprises", "/ui/datasets/enterprises/policies/1",
                 f"/ui/jobs/{job_id}"]:
        hidden = other.get(path)
        assert hidden.status_code == 404, path
    missing = other.get("/ui/datasets/no_such_dataset")
    assert missing.status_code == 404
    hidden = other.get("/ui/datasets/enterprises").text
    assert re.search(r'role="alert">([^<]*)<', hidden).group(1).replace("enterprises", "X") \
        == re.search(r'role="alert">([^<]*)<', missing.text).group(1).replace(
            "no_such_dataset", "X")
    assert "enterprises" not in other.get("/ui/datasets").text
    assert job_id[:12] not in other.get("/ui/jobs").text
    assert "policy.approved" not in other.get("/ui/audit").text
    approve = other.post("/ui/datasets/enterprises/policies/1/approve",
                         data={"csrf_token": csrf(other)})
    assert approve.status_code == 404
    owner = sign_in(ready, ready.home.tokens["owner"])
    assert job_id[:12] in owner.get("/ui/jobs").text
    assert owner.get(f"/ui/jobs/{job_id}").status_code == 200


def test_roles_get_their_pages_and_403_elsewhere(ready: Api) -> None:
    job_id = pending_job(ready)
    expected = {
        "owner": {"/ui/datasets": 200, "/ui/reviews": 403, "/ui/audit": 200,
                  f"/ui/reviews/{job_id}": 403},
        "reviewer": {"/ui/datasets": 403, "/ui/reviews": 200, "/ui/audit": 403,
                     f"/ui/reviews/{job_id}": 200},
        "admin": {"/ui/datasets": 403, "/ui/reviews": 403, "/ui/audit": 200,
                  f"/ui/jobs/{job_id}": 200},
        "analyst": {"/ui/datasets": 403, "/ui/reviews": 403, "/ui/audit": 403,
                    f"/ui/jobs/{job_id}": 200, f"/ui/reviews/{job_id}": 403},
    }
    for role, paths in expected.items():
        client = sign_in(ready, ready.home.tokens[role])
        for path, status in paths.items():
            assert client.get(path).status_code == status, (role, path)
    analyst_home = sign_in(ready, ready.home.tokens["analyst"]).get("/ui/").text
    assert "These pages are for data owners and reviewers" in analyst_home
    forbidden = [a for a in _actions(ready) if a == "access.forbidden"]
    assert len(forbidden) >= 8  # every 403 is audited, as in the API


def test_reviewer_of_the_jobs_own_organisation_sees_404(ready: Api) -> None:
    job_id = pending_job(ready)
    token = add_user(ready, "reviewer-own", "suzhou-analytics", Role.REVIEWER)
    colleague = sign_in(ready, token)
    assert colleague.get(f"/ui/reviews/{job_id}").status_code == 404
    assert colleague.get(f"/ui/jobs/{job_id}").status_code == 404
    assert job_id[:12] not in colleague.get("/ui/reviews").text


def test_unknown_pages_and_bad_parameters_are_html(ready: Api) -> None:
    client = sign_in(ready, ready.home.tokens["owner"])
    for path, status in [("/ui/nope", 404), ("/ui/jobs?status=bogus", 422),
                         ("/ui/datasets/enterprises/policies/0", 422)]:
        response = client.get(path)
        assert response.status_code == status, path
        assert response.headers["content-type"].startswith("text/html")
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
