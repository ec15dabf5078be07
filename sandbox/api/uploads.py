"""Streaming multipart uploads into RAM-backed temporary files, under a byte cap.

Starlette's own form parser spools large files to the default temp directory, which is
usually persistent disk. Uploaded datasets are plaintext, so this parser writes file
parts only into a private 0700 directory on tmpfs and stops reading at the cap (413).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from python_multipart import FormParser
from python_multipart.multipart import parse_options_header

MAX_FIELD_BYTES = 1024 * 1024


@dataclass
class Upload:
    fields: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    filenames: dict[str, str] = field(default_factory=dict)


@asynccontextmanager
async def receive_multipart(request: Request, *, tmp_root: Path,
                            max_bytes: int) -> AsyncIterator[Upload]:
    """Parse a ``multipart/form-data`` body; files live only inside the ``async with``."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(415, "expected multipart/form-data")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"upload is larger than the cap of {max_bytes} bytes")
    directory = Path(tempfile.mkdtemp(prefix="sbx-upload-", dir=tmp_root))
    upload = Upload()

    def on_field(f: Any) -> None:
        name = (f.field_name or b"").decode(errors="replace")
        value = f.value or b""
        if len(value) > MAX_FIELD_BYTES:
            raise HTTPException(413, f"form field {name!r} is too large")
        upload.fields[name] = value

    def on_file(f: Any) -> None:
        name = (f.field_name or b"").decode(errors="replace")
        f.file_object.close()
        upload.files[name] = Path(f.actual_file_name.decode())
        upload.filenames[name] = (f.file_name or b"").decode(errors="replace")

    try:
        parser = FormParser(
            "multipart/form-data", on_field, on_file, boundary=params[b"boundary"],
            config={"UPLOAD_DIR": str(directory), "MAX_MEMORY_FILE_SIZE": 0,
                    "UPLOAD_KEEP_FILENAME": False, "UPLOAD_KEEP_EXTENSIONS": False,
                    "UPLOAD_DELETE_TMP": False, "MAX_BODY_SIZE": max_bytes})
    except Exception:
        shutil.rmtree(directory, ignore_errors=True)
        raise HTTPException(400, "malformed multipart/form-data body") from None
    try:
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise HTTPException(413, f"upload is larger than the cap of {max_bytes} "
                                             "bytes")
                parser.write(chunk)
            parser.finalize()
        except HTTPException:
            raise
        except Exception:  # the parser's own errors: a malformed body, never a 500
            raise HTTPException(400, "malformed multipart/form-data body") from None
        yield upload
    finally:
        shutil.rmtree(directory, ignore_errors=True)
