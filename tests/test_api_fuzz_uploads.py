"""Hand-made hostile multipart uploads and missing or broken tokens, for every role
(split from test_api_fuzz.py: the schemathesis part lives there)."""


from __future__ import annotations

import json
import re
import shutil
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Api, make_home
from fastapi.routing import APIRoute

ROLES = ("owner", "analyst", "reviewer", "admin")
PUBLIC_V1 = {("GET", "/v1/health"), ("GET", "/v1/releases/public-key")}


# --------------------------------------------------------------------------------------
# The multipart upload, by hand
# --------------------------------------------------------------------------------------

BOUNDARY = "sbxfuzzboundary"


def _multipart(*parts: tuple[str, str | None, bytes], boundary: str = BOUNDARY,
               close: bool = True) -> bytes:
    """``parts``: (field name, file name or None, content)."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += content + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out


def _upload_cases(schema_text: bytes, data: bytes) -> dict[str, tuple[dict[str, str], bytes]]:
    mp = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    good_schema = ("schema", None, schema_text)
    good_data = ("data", "enterprises.parquet", data)
    bomb = b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n".encode()
        for p, c in zip("abcde", "bcdef", strict=True)) + b"name: *f\n"
    cases: dict[str, tuple[dict[str, str], bytes]] = {
        "empty body": (mp, b""),
        "no parts": (mp, f"--{BOUNDARY}--\r\n".encode()),
        "missing data part": (mp, _multipart(good_schema)),
        "missing schema part": (mp, _multipart(good_data)),
        "data as a plain field": (mp, _multipart(good_schema, ("data", None, b"1,2,3"))),
        "schema as a file": (mp, _multipart(("schema", "s.yaml", schema_text), good_data)),
        "json instead of multipart": ({"Content-Type": "application/json"},
                                      json.dumps({"schema": "x", "data": "y"}).encode()),
        "text/plain": ({"Content-Type": "text/plain"}, b"hello"),
        "no content type": ({}, _multipart(good_schema, good_data)),
        "multipart without boundary": ({"Content-Type": "multipart/form-data"},
                                       _multipart(good_schema, good_data)),
        "wrong boundary": ({"Content-Type": "multipart/form-data; boundary=other"},
                           _multipart(good_schema, good_data)),
        "truncated body": (mp, _multipart(good_schema, good_data)[:300]),
        "unterminated multipart": (mp, _multipart(good_schema, good_data, close=False)),
        "garbage bytes": (mp, bytes(range(256)) * 4),
        "garbage schema yaml": (mp, _multipart(("schema", None, b"::: [unclosed\n\t- {"),
                                               good_data)),
        "schema yaml is a list": (mp, _multipart(("schema", None, b"- 1\n- 2\n"), good_data)),
        "schema yaml is a scalar": (mp, _multipart(("schema", None, b"42"), good_data)),
        "schema yaml is null": (mp, _multipart(("schema", None, b"~"), good_data)),
        "schema yaml empty": (mp, _multipart(("schema", None, b""), good_data)),
        "schema yaml not utf-8": (mp, _multipart(("schema", None, b"\xff\xfe\x00name: \xc3"),
                                                 good_data)),
        "schema yaml python tag": (mp, _multipart(
            ("schema", None, b"!!python/object/apply:os.system ['true']"), good_data)),
        "schema yaml alias bomb": (mp, _multipart(("schema", None, bomb), good_data)),
        "schema missing columns": (mp, _multipart(("schema", None, re.sub(
            rb"(?s)columns:.*", b"", schema_text)), good_data)),
        "schema of another organisation": (mp, _multipart(("schema", None, schema_text.replace(
            b"owner_organisation: jiangsu-data-bureau", b"owner_organisation: someone-else")),
            good_data)),
        "schema name with path": (mp, _multipart(("schema", None, schema_text.replace(
            b"name: enterprises\n", b"name: ../../etc/passwd\n", 1)), good_data)),
        "unknown format field": (mp, _multipart(good_schema, good_data,
                                                ("format", None, b"xlsx"))),
        "format csv for parquet bytes": (mp, _multipart(good_schema, good_data,
                                                        ("format", None, b"csv"))),
        "no extension and no format": (mp, _multipart(good_schema, ("data", "data", data))),
        "garbage parquet": (mp, _multipart(good_schema, ("data", "x.parquet",
                                                         b"PAR1 not really PAR1"))),
        "empty data file": (mp, _multipart(good_schema, ("data", "x.parquet", b""))),
        "garbage csv": (mp, _multipart(good_schema, ("data", "x.csv",
                                                     b"\x00\x01\"unclosed,\n\xff\xfe"))),
        "csv with wrong columns": (mp, _multipart(good_schema, ("data", "x.csv",
                                                                b"a,b\n1,2\n"))),
        "field name not utf-8": (mp, f"--{BOUNDARY}\r\nContent-Disposition: form-data; "
                                     'name="sch\xe9ma"\r\n\r\nx\r\n'.encode("latin-1")
                                 + _multipart(good_data)),
        "schema yaml deeply nested": (mp, _multipart(("schema", None, b"[" * 1000 + b"]" * 1000),
                                                     good_data)),
        "schema yaml invalid date": (mp, _multipart(("schema", None,
                                                     schema_text + b"\nnote: 2020-13-01\n"),
                                                    good_data)),
        "schema yaml 5000-digit int": (mp, _multipart(("schema", None, re.sub(
            rb"max_rows: \d+", b"max_rows: " + b"9" * 5000, schema_text)), good_data)),
        "part without content-disposition": (mp, f"--{BOUNDARY}\r\nX-Foo: bar\r\n\r\nx\r\n"
                                             f"--{BOUNDARY}--\r\n".encode()),
        "content-disposition without name": (mp, f"--{BOUNDARY}\r\nContent-Disposition: "
                                             f"form-data\r\n\r\nx\r\n--{BOUNDARY}--\r\n"
                                             .encode()),
        "malformed part header": (mp, f"--{BOUNDARY}\r\nno-colon-here\r\n\r\nx\r\n"
                                  f"--{BOUNDARY}--\r\n".encode()),
        "preamble before first boundary": (mp, b"junk\r\n" + _multipart(good_schema,
                                                                          good_data)),
        "boundary over 256 bytes": ({"Content-Type": "multipart/form-data; boundary="
                                     + "b" * 300}, b"x"),
        "format field not utf-8": (mp, _multipart(good_schema, good_data,
                                                  ("format", None, b"\xff"))),
        "file field name not utf-8": (mp, _multipart(good_schema).replace(
            f"--{BOUNDARY}--\r\n".encode(), b"")
            + f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"d\xe9\"; "
              'filename="x.parquet"\r\n\r\n'.encode("latin-1") + b"x\r\n"
            + f"--{BOUNDARY}--\r\n".encode()),
        "oversized schema field": (mp, _multipart(("schema", None, b"#" * (1024 * 1024 + 1)),
                                                  good_data)),
    }
    return cases


@pytest.fixture(scope="module")
def upload_world(tmp_path_factory: pytest.TempPathFactory,
                 demo_files: tuple[Path, Path]) -> Iterator[tuple[Api, bytes, bytes]]:
    home = make_home(tmp_path_factory.mktemp("fuzz-upload"))
    api = Api(home)
    data, schema_path = demo_files
    yield api, schema_path.read_bytes(), data.read_bytes()
    home.runtime.close()


_UPLOAD_CASE_NAMES = list(_upload_cases(b"name: x\n", b"").keys())


@pytest.mark.parametrize("name", _UPLOAD_CASE_NAMES)
def test_upload_malformed(upload_world: tuple[Api, bytes, bytes], name: str) -> None:
    api, schema_text, data = upload_world
    headers, body = _upload_cases(schema_text, data)[name]
    settings = api.home.settings
    places = (settings.tmpfs_dir, settings.effective_upload_spool_dir)

    def spools() -> set[Path]:  # uploads are plaintext (tmpfs) or its ciphertext (spool)
        return {entry for place in places for entry in place.glob("sbx-upload-*")}

    before = spools()
    error: Exception | None = None
    try:
        response = api.as_("owner").post("/v1/datasets", content=body, headers=headers)
    except Exception as exc:
        error = exc
    # Nothing of an upload may stay behind. Remove what leaked (so later tests that look
    # there are not blamed), then fail on it.
    leaked = sorted(str(d) for d in spools() - before)
    for directory in leaked:
        shutil.rmtree(directory, ignore_errors=True)
    if error is not None:
        tail = "".join(traceback.format_exception(error)[-8:])
        raise AssertionError(f"unhandled exception: role=owner POST /v1/datasets "
                             f"case={name!r} headers={headers!r} leaked={leaked}\n{tail}"
                             ) from error
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
    assert response.json().get("detail"), response.text
    assert not leaked, f"upload spool directories left behind: {leaked}"


@pytest.mark.parametrize("role", ["analyst", "reviewer", "admin"])
def test_upload_by_non_owner_is_403(upload_world: tuple[Api, bytes, bytes], role: str) -> None:
    api, schema_text, data = upload_world
    response = api.as_(role).post("/v1/datasets", data={"schema": schema_text.decode()},
                                  files={"data": ("enterprises.parquet", data)})
    assert response.status_code == 403, response.text


# --------------------------------------------------------------------------------------
# No token, broken tokens
# --------------------------------------------------------------------------------------

BAD_AUTH: dict[str, str | bytes | None] = {
    "none": None,
    "empty": "",
    "scheme only": "Bearer",
    "scheme and space": "Bearer ",
    "unknown token": "Bearer sbx_" + "A" * 43,
    "garbage token": b"Bearer \xff\xfe not a token",
    "basic": "Basic dXNlcjpwYXNz",
    "two tokens": "Bearer a b",
    "very long": "Bearer " + "x" * 10_000,
}


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: "1" if "version" in m.group(0) else "enterprises",
                  path)


def _routes(app: Any) -> list[tuple[str, str]]:
    return sorted({(method, route.path) for route in app.routes if isinstance(route, APIRoute)
                   for method in (route.methods or ()) if method not in ("HEAD", "OPTIONS")})


@pytest.mark.parametrize("auth", list(BAD_AUTH), ids=list(BAD_AUTH))
def test_no_token_is_401(upload_world: tuple[Api, bytes, bytes], auth: str) -> None:
    from fastapi.testclient import TestClient
    api = upload_world[0]
    client = TestClient(api.app, raise_server_exceptions=False)
    header = BAD_AUTH[auth]
    headers = {} if header is None else {"Authorization": header}
    wrong = []
    for method, path in _routes(api.app):
        response = client.request(method, _concrete(path), headers=headers)
        if not path.startswith("/v1/"):
            expected_ok = response.status_code < 500
        elif (method, path) in PUBLIC_V1:
            expected_ok = response.status_code == 200
        else:
            expected_ok = response.status_code == 401 and \
                response.headers.get("www-authenticate", "").lower().startswith("bearer")
        if not expected_ok:
            wrong.append(f"{method} {path}: {response.status_code} {response.text[:120]}")
    assert not wrong, "\n".join(wrong)

