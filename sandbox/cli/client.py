"""A small HTTP client for every role's steps (``httpx``).

Errors from the server come back as ``ApiError`` carrying the status code and the
server's ``detail`` message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx


class ApiError(Exception):
    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class _ProgressReader:
    """A file wrapper that reports how many bytes have been read (for upload progress)."""

    def __init__(self, handle: BinaryIO, report: Callable[[int], None]) -> None:
        self._handle = handle
        self._report = report
        self._sent = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._sent += len(chunk)
        self._report(self._sent)
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(1024 * 1024):
            yield chunk


class SandboxClient:
    """One caller (one token) talking to one server."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 120.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response.json()

    # data owner
    def register_dataset(self, schema_path: Path, data_path: Path, *,
                         progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Upload ``data_path``; ``progress`` is called with the bytes sent so far."""
        with open(data_path, "rb") as data:
            source: Any = _ProgressReader(data, progress) if progress else data
            return self._call("POST", "/v1/datasets",
                              data={"schema": Path(schema_path).read_text()},
                              files={"data": (Path(data_path).name, source)})

    def delete_dataset(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/datasets/{name}")

    def mock_data(self, name: str, *, fmt: str = "csv", rows: int = 1000,
                  seed: int = 0) -> bytes:
        response = self._http.get(f"/v1/datasets/{name}/mock",
                                  params={"format": fmt, "rows": rows, "seed": seed})
        if response.status_code >= 400:
            raise ApiError(response.status_code, response.json().get("detail"))
        return response.content

    def draft_policy(self, dataset: str, policy_yaml: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/datasets/{dataset}/policies", json={"yaml": policy_yaml})

    def approve_policy(self, dataset: str, version: int) -> dict[str, Any]:
        return self._call("POST", f"/v1/datasets/{dataset}/policies/{version}/approve")

    def policies(self, dataset: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/datasets/{dataset}/policies")

    # everyone
    def datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/datasets")

    def dataset(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/datasets/{name}")

    def budget(self, dataset: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/budget/{dataset}")

    # analyst
    def estimate(self, query: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/queries/estimate", json=query)

    def submit_query(self, query: dict[str, Any], *,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key or uuid.uuid4().hex
        return self._call("POST", "/v1/jobs", json={"kind": "query", "query": query},
                          headers={"Idempotency-Key": key})

    def submit_sql(self, text: str, *, epsilon: float | None = None, rho: float | None = None,
                   idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key or uuid.uuid4().hex
        return self._call("POST", "/v1/jobs",
                          json={"kind": "query", "sql": {"text": text, "epsilon": epsilon,
                                                         "rho": rho}},
                          headers={"Idempotency-Key": key})

    def submit_script(self, dataset: str, source: str, *, mode: str = "real",
                      idempotency_key: str | None = None) -> dict[str, Any]:
        key = idempotency_key or uuid.uuid4().hex
        return self._call("POST", "/v1/jobs",
                          json={"kind": "script", "script": {"dataset": dataset,
                                                             "source": source, "mode": mode}},
                          headers={"Idempotency-Key": key})

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, *, until: tuple[str, ...] = ("pending_review", "released",
                                                             "rejected", "failed",
                                                             "cancelled"),
             timeout: float = 120.0, poll: float = 0.2) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def result(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}/result")

    # reviewer
    def review_queue(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/reviews")

    def review(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/reviews/{job_id}")

    def approve(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/reviews/{job_id}/approve")

    def reject(self, job_id: str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/reviews/{job_id}/reject", json={"reason": reason})

    def release(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/releases/{job_id}")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/v1/health")
