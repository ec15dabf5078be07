"""The ``multipart/form-data`` parser of uploads: only the parts a form declares.

A form (:class:`FormSpec`) names its text fields, each with a byte cap, and its file
parts. Anything else is refused with 400 as soon as its headers are read, before any of
its data is kept: a part with another name, a part sent twice, a declared field sent as
a file or a declared file sent as a field. So a request can hold at most the declared
fields in memory (their caps, and :attr:`FormSpec.max_field_bytes` for all of them
together) and can make at most one spool file per declared file part: thousands of tiny
parts cannot make the server allocate, encrypt and wipe a spool writer's buffers for each
of them on the event loop. Part headers are bounded by ``python_multipart`` itself (8
headers of at most about 4 KiB per part).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from python_multipart.decoders import Base64Decoder, QuotedPrintableDecoder
from python_multipart.multipart import MultipartParser, parse_options_header

from sandbox.datasets.spool import SpoolFile, SpoolWriter, UploadSpool

__all__ = ["MAX_FIELD_BYTES", "FormParser", "FormSpec", "Upload"]

#: Default cap of one text field, and of all text fields of a form together.
MAX_FIELD_BYTES = 1024 * 1024
_IDENTITY_ENCODINGS = frozenset({b"", b"7bit", b"8bit", b"binary"})
_SHOWN_NAME = 64  # characters of a refused part's name echoed in an error


@dataclass(frozen=True)
class FormSpec:
    """The parts a form accepts: ``fields`` (text, in memory) by name with the cap of
    each in bytes, ``files`` (spooled encrypted) by name, and ``max_field_bytes`` for all
    text fields together. Every part is optional here (the endpoint says what it needs),
    but each may come at most once."""

    fields: Mapping[str, int]
    files: frozenset[str]
    max_field_bytes: int = MAX_FIELD_BYTES

    def describe(self) -> str:
        """The accepted parts, for error messages."""
        text = ", ".join(repr(name) for name in sorted(self.fields))
        files = ", ".join(repr(name) for name in sorted(self.files))
        return f"the text fields {text} and the file {files}" if len(self.files) == 1 \
            else f"the text fields {text} and the files {files}"


@dataclass
class Upload:
    """A received form: text fields in memory, file parts as encrypted spool files
    (readable through :meth:`SpoolFile.open` or, by path, by ingest), and the file
    names the client gave."""

    fields: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, SpoolFile] = field(default_factory=dict)
    filenames: dict[str, str] = field(default_factory=dict)


class FormParser:
    """``multipart/form-data`` into an :class:`Upload`, accepting only ``spec``'s parts:
    declared file parts go to ``spool`` (a spool writer, with its buffers, is made only
    for them), declared fields to memory.

    :meth:`write` and :meth:`finish` raise ``HTTPException`` (400 for a refused part or a
    truncated body, 413 for a field over its cap), the parser's own ``ValueError`` (and
    kin) for a malformed body, and ``OSError`` from the spool.
    """

    def __init__(self, spool: UploadSpool, boundary: bytes, upload: Upload,
                 spec: FormSpec) -> None:
        self.spool = spool
        self.upload = upload
        self.spec = spec
        self.ended = False
        self._field_bytes = 0  # all text fields so far
        self._seen: set[str] = set()
        self._header_name: list[bytes] = []
        self._header_value: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None
        self._field: _FieldBuffer | None = None
        self._writer: SpoolWriter | None = None
        self._sink: Any = None  # what part data is written to (maybe through a decoder)
        callbacks: dict[str, Callable[..., None]] = {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end}
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def finish(self) -> None:
        self._parser.finalize()
        if not self.ended:
            raise HTTPException(400, "the multipart/form-data body ends before its closing "
                                     "boundary (a truncated upload?); nothing was stored")

    def add_field_bytes(self, name: str, n: int) -> None:
        """Count ``n`` more bytes of text fields; 413 over the form's total."""
        self._field_bytes += n
        if self._field_bytes > self.spec.max_field_bytes:
            raise HTTPException(413, f"form fields are larger than {self.spec.max_field_bytes}"
                                     f" bytes in all (at field {_shown(name)})")

    # -- callbacks -----------------------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name.append(data[start:end])

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value.append(data[start:end])

    def _header_end(self) -> None:
        name = b"".join(self._header_name).lower()
        self._headers[name] = b"".join(self._header_value).strip(b" \t")
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if b"name" not in options:
            raise HTTPException(400, "a multipart part has no Content-Disposition name")
        self._name = name = options[b"name"].decode(errors="replace")
        filename = options.get(b"filename")
        self._filename = None if filename is None else filename.decode(errors="replace")
        self._accept(name, is_file=self._filename is not None)
        target: Any
        if self._filename is None:
            self._field = target = _FieldBuffer(name, self.spec.fields[name], self)
        else:
            self._writer = target = self.spool.create()  # the only place buffers are made
        encoding = self._headers.get(b"content-transfer-encoding", b"").lower()
        if encoding == b"base64":
            target = Base64Decoder(target)
        elif encoding == b"quoted-printable":
            target = QuotedPrintableDecoder(target)
        elif encoding not in _IDENTITY_ENCODINGS:
            shown = encoding.decode(errors="replace")[:_SHOWN_NAME]
            raise HTTPException(400, f"form field {_shown(name)}: unsupported "
                                     f"Content-Transfer-Encoding {shown!r}")
        self._sink = target

    def _accept(self, name: str, *, is_file: bool) -> None:
        """400 unless ``name`` is a part of the form, of this kind, not seen before."""
        if name in self._seen:
            raise HTTPException(400, f"form part {_shown(name)} is sent more than once")
        self._seen.add(name)
        if name in (self.spec.files if is_file else self.spec.fields):
            return
        if name in self.spec.files:
            raise HTTPException(400, f"form part {_shown(name)} must be a file (a part "
                                     "with a filename), not a text field")
        if name in self.spec.fields:
            raise HTTPException(400, f"form part {_shown(name)} must be a text field, not "
                                     "a file")
        raise HTTPException(400, f"unexpected form part {_shown(name)}: this form takes "
                                 f"only {self.spec.describe()}; nothing was stored")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._sink.write(memoryview(data)[start:end])

    def _part_end(self) -> None:
        if hasattr(self._sink, "finalize"):
            self._sink.finalize()  # a decoder: flushes its tail into the target
        if self._writer is not None:
            self.upload.files[self._name] = self._writer.finish()
            self.upload.filenames[self._name] = self._filename or ""
            self._writer = None
        elif self._field is not None:
            self.upload.fields[self._name] = bytes(self._field.data)
            self._field = None
        self._sink = None

    def _end(self) -> None:
        self.ended = True


def _shown(name: str) -> str:
    """A part name as echoed in errors: quoted, at most :data:`_SHOWN_NAME` characters."""
    return repr(name if len(name) <= _SHOWN_NAME else name[:_SHOWN_NAME] + "...")


class _FieldBuffer:
    """The in-memory target of a text field part, capped at ``cap`` bytes and counted
    against the form's total."""

    def __init__(self, name: str, cap: int, parser: FormParser) -> None:
        self.name = name
        self.cap = cap
        self.parser = parser
        self.data = bytearray()

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if len(self.data) + n > self.cap:
            raise HTTPException(413, f"form field {_shown(self.name)} is larger than "
                                     f"{self.cap} bytes")
        self.parser.add_field_bytes(self.name, n)
        self.data += data
        return n

    def finalize(self) -> None:
        """Nothing to flush (decoders call it)."""
