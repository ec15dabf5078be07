"""Reviewing through the web pages: approve and reject move the job exactly as the API
does (same state, same audit events, same rules), the two-person rule, clear refusals,
outputs shown safely (analyst-controlled strings escaped, figures only as verified
PNG), release signatures, and the owner's pages."""

from __future__ import annotations

import base64
import io
import shutil

import pytest
from conftest import POLICY_YAML, Api, missing_part
from markupsafe import escape
from sqlalchemy import select
from test_web_support import add_user, csrf, pending_job, sign_in

from sandbox.db.models import AuditEvent, Job, JobResult
from sandbox.identity.service import Role
from sandbox.web.outputs import figure, render

NOISY_KEYS = {"sha256", "spent_after", "worker"}


def _events(api: Api, job_id: str) -> list[tuple[str, str | None, dict]]:
    with api.home.runtime.db.transaction() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.object_id == job_id)
                               .order_by(AuditEvent.seq))
        return [(e.action, e.actor_id, {k: v for k, v in e.detail.items()
                                        if k not in NOISY_KEYS}) for e in rows]


def _job(api: Api, job_id: str) -> Job:
    with api.home.runtime.db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_approve_through_the_page_is_the_apis_approve(ready: Api) -> None:
    by_api, by_page = pending_job(ready), pending_job(ready)
    assert ready.as_("reviewer").post(f"/v1/reviews/{by_api}/approve").status_code == 200
    reviewer = sign_in(ready, ready.home.tokens["reviewer"])
    page = reviewer.get(f"/ui/reviews/{by_page}")
    assert page.status_code == 200 and "Approve" in page.text
    response = reviewer.post(f"/ui/reviews/{by_page}/approve",
                             data={"csrf_token": csrf(reviewer, f"/ui/reviews/{by_page}")},
                             follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == f"/ui/reviews/{by_page}?done=approved"
    assert _job(ready, by_page).status == _job(ready, by_api).status == "released"
    assert _events(ready, by_page) == _events(ready, by_api)
    assert [e[0] for e in _events(ready, by_page)][-3:] == [
        "review.approved", "job.released", "release.signed"]
    result = ready.as_("analyst").get(f"/v1/jobs/{by_page}/result")
    assert result.status_code == 200
    released = reviewer.get(response.headers["location"]).text
    assert "Approved: the output is released and signed." in released
    assert "valid: signed by this server&#39;s key" in released
    assert result.json()["sha256"] in released
    assert "Approve</button>" not in released  # no decision forms once decided


def test_reject_through_the_page_is_the_apis_reject(ready: Api) -> None:
    by_api, by_page = pending_job(ready), pending_job(ready)
    reason = "groups too small for <this> purpose & \"quoted\""
    ready.as_("reviewer").post(f"/v1/reviews/{by_api}/reject", json={"reason": reason})
    reviewer = sign_in(ready, ready.home.tokens["reviewer"])
    token = csrf(reviewer, f"/ui/reviews/{by_page}")
    empty = reviewer.post(f"/ui/reviews/{by_page}/reject",
                          data={"csrf_token": token, "reason": "   "})
    assert empty.status_code == 422 and "needs a reason" in empty.text
    assert _job(ready, by_page).status == "pending_review"
    response = reviewer.post(f"/ui/reviews/{by_page}/reject",
                             data={"csrf_token": token, "reason": reason},
                             follow_redirects=False)
    assert response.status_code == 303
    page_job, api_job = _job(ready, by_page), _job(ready, by_api)
    assert page_job.status == api_job.status == "rejected"
    assert page_job.error_public == api_job.error_public == f"rejected by review: {reason}"
    assert _events(ready, by_page) == _events(ready, by_api)
    shown = reviewer.get(response.headers["location"]).text
    assert str(escape(reason)) in shown and "<this>" not in shown
    again = reviewer.post(f"/ui/reviews/{by_page}/approve", data={"csrf_token": token})
    assert again.status_code == 409 and "not waiting for review" in again.text


def test_two_person_rule_through_the_pages(api: Api, demo_files) -> None:
    api.register(demo_files)
    api.approve_policy(POLICY_YAML.replace("review_required: true",
                                           "review_required: true\napprovals: 2"))
    job_id = pending_job(api)
    first = sign_in(api, api.home.tokens["reviewer"])
    path = f"/ui/reviews/{job_id}"
    assert "records your approval; 2 distinct reviewers must approve" in first.get(path).text
    token = csrf(first, path)
    response = first.post(f"{path}/approve", data={"csrf_token": token},
                          follow_redirects=False)
    assert response.headers["location"] == f"{path}?done=recorded"
    page = first.get(response.headers["location"]).text
    assert "another reviewer must also approve" in page and "1 of 2 required" in page
    assert "Approve</button>" not in page and "Reject</button>" in page
    twice = first.post(f"{path}/approve", data={"csrf_token": token})
    assert twice.status_code == 409
    assert "you have already approved this job; another reviewer must approve" in twice.text
    assert _job(api, job_id).status == "pending_review"
    second = sign_in(api, add_user(api, "reviewer-liu", "provincial-review-office",
                                   Role.REVIEWER))
    done = second.post(f"{path}/approve", data={"csrf_token": csrf(second, path)})
    assert done.status_code == 200 and "released and signed" in done.text
    assert _job(api, job_id).status == "released"
    approvals = [e for e in _events(api, job_id) if e[0] == "review.approved"]
    assert [e[2] for e in approvals] == [{"approvals": 1, "required": 2},
                                         {"approvals": 2, "required": 2}]


def test_reviewers_own_organisation_is_refused_as_in_the_api(ready: Api) -> None:
    job_id = pending_job(ready)
    colleague = sign_in(ready, add_user(ready, "reviewer-own", "suzhou-analytics",
                                        Role.REVIEWER))
    response = colleague.post(f"/ui/reviews/{job_id}/approve",
                              data={"csrf_token": csrf(colleague, "/ui/reviews")})
    assert response.status_code == 403  # the API's _reviewable: 403, audited
    assert "own organisation" in response.text
    assert _job(ready, job_id).status == "pending_review"
    owner = sign_in(ready, ready.home.tokens["owner"])
    assert owner.post(f"/ui/reviews/{job_id}/approve",
                      data={"csrf_token": csrf(owner)}).status_code == 403


def test_released_page_shows_when_stored_output_no_longer_matches(ready: Api) -> None:
    job_id = pending_job(ready)
    ready.as_("reviewer").post(f"/v1/reviews/{job_id}/approve")
    with ready.home.runtime.db.transaction() as session:  # an attacker edits the output
        result = session.get(JobResult, job_id)
        result.content = {**result.content, "rows": []}
    page = sign_in(ready, ready.home.tokens["reviewer"]).get(f"/ui/reviews/{job_id}").text
    assert "NO: the stored output no longer has the approved hash" in page
    assert "valid: signed by this server" in page  # the artifact itself is intact


def test_query_output_and_state_machine_on_the_review_page(ready: Api) -> None:
    job_id = pending_job(ready)
    page = sign_in(ready, ready.home.tokens["reviewer"]).get(f"/ui/reviews/{job_id}").text
    assert "result · 13 row(s)" in page and "sum_annual_revenue" in page
    assert "float_precision" in page and "numbers rounded to 6 significant digits" in page
    assert '<g class="state state-current">' in page and ">pending_review</text>" in page
    assert "job.released" in page and "job.rejected" in page  # the moves from here
    assert "budget.charged" in page  # history
    assert "analyst-wang" not in page and "analyst of suzhou-analytics" in page


SCRIPT = '''
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from sandbox.sdk import channel, count, datasets, emit
t = datasets["enterprises"].group_by("city").agg(count()).release(epsilon=0.1)
emit("<b>by_city</b>", t)
emit("<script>alert('name')</script>", "<script>alert('text')</script>")
emit("cells", [{"<i>col</i>": "<img src=x onerror=alert(1)>", "n": 1}])
print("</pre><script>alert('log')</script>")
fig, ax = plt.subplots(figsize=(2, 1))
ax.plot([1, 2], [1, 2])
emit("a real figure", fig)
channel.emit("svg figure", "figure", "PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+")
channel.emit("html figure", "figure", "\\"><script>alert('figure')</script>")
# </textarea><script>alert('source')</script>
'''


def test_script_outputs_are_escaped_and_figures_verified(ready: Api) -> None:
    if shutil.which("bwrap") is None:
        missing_part("bubblewrap (apt-get install bubblewrap)")
    response = ready.as_("analyst").post("/v1/jobs", json={
        "kind": "script", "script": {"dataset": "enterprises", "source": SCRIPT}})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert ready.home.worker().run_once()
    assert _job(ready, job_id).status == "pending_review", _job(ready, job_id).error_public
    reviewer = sign_in(ready, ready.home.tokens["reviewer"])
    page = reviewer.get(f"/ui/reviews/{job_id}").text
    lowered = page.lower()
    assert "<script" not in lowered and "<b>" not in lowered and "<i>" not in lowered
    assert "<img src=x" not in lowered and "<svg onload" not in lowered
    assert "&lt;script&gt;alert(&#39;text&#39;)&lt;/script&gt;" in page
    assert "&lt;script&gt;alert(&#39;name&#39;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;/pre&gt;&lt;script&gt;alert(&#39;log&#39;)&lt;/script&gt;" in page
    assert "&lt;/textarea&gt;&lt;script&gt;alert(&#39;source&#39;)" in page
    assert page.count('<img src="data:image/png;base64,') == 1  # only the real PNG
    assert page.count("not a verified PNG") == 2
    assert "figure is not a readable PNG" in page  # the checks' block finding
    for path in (f"/ui/jobs/{job_id}", "/ui/reviews", "/ui/jobs"):
        assert "<script" not in reviewer.get(path).text.lower()


def _png() -> str:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("payload", "why"), [
    (base64.b64encode(b"<svg onload=alert(1)>").decode(), "no PNG signature"),
    ("javascript:alert(1)", "not base64"),
    (base64.b64encode(b"\x89PNG\r\n\x1a\n<script>").decode(), "Pillow could not read it"),
    (12, "not base64 text"),
    ("A" * (3 * 1024 * 1024), "not base64 text of an allowed size"),
])
def test_figures_are_shown_only_as_verified_png(payload: object, why: str) -> None:
    src, size, problem = figure(payload)
    assert src is None and size is None and problem is not None and why in problem
    src, size, problem = figure(_png())
    assert src is not None and src.startswith("data:image/png;base64,") and size == (3, 2)
    assert problem is None


def test_render_keeps_cells_as_text() -> None:
    content = {"columns": [{"name": "<k>", "kind": "key"}, {"name": "n", "kind": "count"},
                           {"name": "s", "kind": "sum"}],
               "rows": [{"<k>": "<b>x</b>", "n": {"value": 12.5, "low": 1.0, "high": 24.0},
                         "s": {"value": None, "status": "primary:threshold"}}],
               "cost": {"unit": "epsilon", "amount": 0.5, "delta": 0.0}}
    rendered = render(content)
    assert rendered is not None
    (table,) = rendered.tables
    assert table.columns == ["<k>", "n", "s"]
    assert table.rows == [["<b>x</b>", "12.5 (1 to 24)", "suppressed (primary:threshold)"]]


def test_owner_pages_show_metadata_policy_budget_and_job_states(ready: Api, demo_files) -> None:
    job_id = pending_job(ready)
    owner = sign_in(ready, ready.home.tokens["owner"])
    page = owner.get("/ui/datasets/enterprises").text
    for text in ("enterprise_id", "core (never queryable)", "L1</span> public",
                 "group_by, filter, aggregate", "not public", "suzhou-analytics",
                 "granted until 2027-12-31", "pending_review", job_id[:12]):
        assert text in page, text
    rows = 20_000  # the demo files' exact row count is not public
    assert f"{rows:,}" not in page and str(rows) not in page
    policy = owner.get("/ui/datasets/enterprises/policies/1").text
    assert "Regional economic statistics" in policy and "per_organisation: 3.0" in policy
    assert "approved" in policy and "two-person rule" not in policy
    job_page = owner.get(f"/ui/jobs/{job_id}").text
    assert "pending_review" in job_page and "0.5 epsilon" in job_page
    with ready.home.runtime.db.transaction() as session:
        sha = session.get(JobResult, job_id).content_sha256
    assert sha not in job_page and "sum_annual_revenue" not in job_page  # never the output
    assert "analyst-wang" not in job_page and "analyst of suzhou-analytics" in job_page
    audit = owner.get("/ui/audit").text
    assert "policy.approved" in audit and "job.submitted" in audit
    assert "user.created" not in audit and "token.issued" not in audit


def test_owner_approves_a_draft_policy_from_its_page(ready: Api) -> None:
    draft = ready.as_("owner").post("/v1/datasets/enterprises/policies",
                                    json={"yaml": POLICY_YAML.replace("total: 5.0",
                                                                      "total: 4.0")})
    assert draft.status_code == 201
    owner = sign_in(ready, ready.home.tokens["owner"])
    path = "/ui/datasets/enterprises/policies/2"
    page = owner.get(path).text
    assert "draft" in page and "Approve v2" in page
    response = owner.post(f"{path}/approve", data={"csrf_token": csrf(owner, path)},
                          follow_redirects=False)
    assert response.status_code == 303
    assert "now the policy in force" in owner.get(response.headers["location"]).text
    policies = ready.as_("owner").get("/v1/datasets/enterprises/policies").json()
    assert [p["status"] for p in policies] == ["superseded", "approved"]
    again = owner.post(f"{path}/approve", data={"csrf_token": csrf(owner, path)})
    assert again.status_code == 409 and "not draft" in again.text


def test_audit_page_for_admin_verifies_the_chain(ready: Api) -> None:
    admin = sign_in(ready, ready.home.tokens["admin"])
    page = admin.get("/ui/audit").text
    assert "user.created" in page and "Verify the whole chain now" in page
    assert "owner-li" in page  # admins see people by name
    verified = admin.get("/ui/audit?verify=1").text
    assert "Verified now: all" in verified
    with ready.home.runtime.db.transaction() as session:
        event = session.scalar(select(AuditEvent).where(AuditEvent.seq == 2))
        event.detail = {**event.detail, "edited": True}
    broken = admin.get("/ui/audit?verify=1").text
    assert "CHAIN BROKEN at entry 2" in broken
