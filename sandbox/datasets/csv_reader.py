"""Streaming CSV reader with bounded memory, for :mod:`sandbox.datasets.ingest`.

The file is read into ONE reused buffer of ``block_bytes`` and cut at the last line
end; each block is parsed with ``pyarrow.csv.read_csv`` (multi-threaded, declared
column types) and yielded before the next block is read.  Memory is therefore about
the block plus its parsed table, whatever the file size.  (``pyarrow.csv.open_csv``
was measured reading ahead up to 32 blocks when the consumer is slower than the
parser: a 150 MB file was held entirely in memory.)

Quoting: a quote opens a quoted field only at the start of a field; inside it ``""``
is a quote and a lone ``"`` closes it (text after the closing quote, up to the next
comma, is appended: ``"ab"c`` reads as ``abc``); a quote inside an unquoted field is an
ordinary character (``5"`` reads as ``5"``).  These are pyarrow's rules, mirrored by
:data:`_RECORD` for error messages.

Line breaks (CR or LF) inside quoted values are refused, so a record is one line and
cutting blocks at ``\n`` is exact.  This is enforced without a second pass over the
bytes: pyarrow (its chunker too) cuts at line ends regardless of quotes and lets a quoted
field that is never closed run on to the end of its chunk, swallowing the line ends in
between.  A swallowed line end therefore always lands inside a value: in a string
column, :func:`_check_line_breaks` finds it in the parsed values (a cheap scan of the
string data); in any other column, the value does not convert and the parse fails.
Either way the block is re-read by :func:`_walk`, which names the row and column where
the unterminated quote opens.  The one case without a swallowed line end, a quote left
open on the last line of a file without a final newline, is checked on that line alone.

Lines end with LF or CRLF.  Blank lines are skipped, except in a one-column file, where
an empty line is a null value.  Errors name the GLOBAL data row (and line, for
ragged rows and quoting) across blocks: rows are data rows counted from 1 as pyarrow
counts them (blank lines not counted), lines are the file's physical lines (the header
is line 1), both found by :func:`_walk`.  Invalid UTF-8 is reported with row, column and
byte offset, never with the bytes themselves.
"""

from __future__ import annotations

import codecs
import csv
import functools
import re
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from sandbox.datasets.checks import IngestError, check_column_set, q, show
from sandbox.datasets.schema import DatasetSchema

__all__ = ["CSV_BLOCK_BYTES", "iter_csv_pieces"]

#: Default bytes of CSV parsed per block.  8 MiB keeps peak memory near 100 MB on a
#: large file and parses as fast as 16 MiB (measured; see the module docstring).
CSV_BLOCK_BYTES = 8 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_SUB_BLOCK = 1 << 20  # pyarrow's parallel parse unit inside a block
_CONVERSION_RE = re.compile(
    r"In CSV column #(\d+): CSV conversion error to ([^:]+): invalid value '(.*)'\s*$", re.S
)
# One field and one record as pyarrow reads them (see the module docstring), except that
# a quoted field must close on its line.  Possessive: a field starting with a quote that
# is not closed on its line matches nothing, so the record does not match.
_QUOTED = rb'"(?:[^"\r\n]|"")*+"[^,\r\n]*+'
_FIELD = re.compile(rb"(?>" + _QUOTED + rb'|[^",\r\n][^,\r\n]*+|)')
_LINE_END = rb"(?:\r\n|\n|\r|\Z)"
_RECORD = re.compile(_FIELD.pattern + rb"(?:," + _FIELD.pattern + rb")*+" + _LINE_END)
_QUOTE_ADVICE = (
    'is not closed on that line (a quote inside a quoted value must be doubled: ""; '
    "line breaks inside quoted values are not supported)"
)


class _Blocks:
    """Reads line-aligned blocks of a binary file into one reused ``bytearray``."""

    def __init__(self, fh: BinaryIO, block_bytes: int) -> None:
        self.fh = fh
        self.buf = bytearray(block_bytes)
        self.view = memoryview(self.buf)
        self.have = 0  # valid bytes in buf
        self.eof = False

    def fill(self) -> None:
        """Read until the buffer is full or the file ends."""
        while not self.eof and self.have < len(self.buf):
            got = self.fh.readinto(self.view[self.have :])  # type: ignore[attr-defined]
            if not got:
                self.eof = True
            else:
                self.have += got

    def drop(self, n: int) -> None:
        """Discard the first ``n`` bytes (move the rest to the front)."""
        self.view[: self.have - n] = self.view[n : self.have]
        self.have -= n

    def line_end(self) -> int:
        """Length of the longest prefix that ends a line (all of it at end of file);
        0 if the buffer holds no complete line."""
        if self.eof:
            return self.have
        return self.buf.rfind(b"\n", 0, self.have) + 1


@functools.lru_cache(maxsize=8)
def _record_of(fields: int) -> re.Pattern[bytes]:
    """A record of exactly ``fields`` fields (``fields`` >= 1)."""
    more = rb"(?:," + _FIELD.pattern + rb"){%d}" % (fields - 1)
    return re.compile(_FIELD.pattern + more + _LINE_END)


def _convert_options(schema: DatasetSchema, columns: list[str] | None) -> pcsv.ConvertOptions:
    """Declared types; only an empty unquoted field is null (``""`` is the empty string)."""
    return pcsv.ConvertOptions(
        column_types={c.name: c.arrow_type for c in schema.columns},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
        include_columns=columns or [],
    )


def _header(blocks: _Blocks, schema: DatasetSchema) -> list[str]:
    """Parse and check the header line, and drop it from the buffer."""
    blocks.fill()
    buf = blocks.buf
    if buf.startswith(_BOM):
        raise IngestError(
            "the file starts with a UTF-8 byte order mark (BOM); save it as UTF-8 without BOM"
        )
    end = buf.find(b"\n", 0, blocks.have)
    if end < 0 and not blocks.eof:
        raise IngestError(f"the header line is longer than {len(buf)} bytes")
    end = blocks.have if end < 0 else end
    first = bytes(buf[:end]).rstrip(b"\r")
    if b"\x00" in first:
        raise IngestError("NUL byte at line 1; this is not a UTF-8 text CSV")
    if not first.strip():
        raise IngestError("the first line must be the header with the column names")
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IngestError(
            f"the header line is not valid UTF-8 (byte offset {exc.start}); the file must be "
            "encoded as UTF-8"
        ) from None
    spot = _walk(first, count_empty=True)
    if spot is not None:
        raise IngestError(
            f"the header line (line 1): unterminated quoted field: the quote opening field "
            f"{spot.field + 1} {_QUOTE_ADVICE}"
        )
    header = next(csv.reader([text]))
    check_column_set(header, schema)
    blocks.drop(min(end + 1, blocks.have))
    return header


def iter_csv_pieces(
    fh: BinaryIO,
    schema: DatasetSchema,
    *,
    block_bytes: int = CSV_BLOCK_BYTES,
    columns: list[str] | None = None,
) -> Iterator[tuple[pa.Table, int]]:
    """Yield ``(table, bytes_consumed)`` for each block of the CSV file ``fh``.

    ``fh`` is read from its start.  The header is checked against the declared column
    set first.  ``table`` holds the block's rows with declared Arrow types (all columns,
    or only ``columns``), not yet range-checked; ``bytes_consumed`` is the file offset
    after the block.  Raises :class:`IngestError` for a BOM, a NUL byte, a line longer
    than ``block_bytes``, a ragged row or a value that does not parse as its type,
    naming the global row and column; for a quoted field not closed on its line (an
    unterminated quote, or a line break inside a quoted value) and for bytes that are not
    UTF-8, naming the row, column and line or byte offset, never the data.  Nothing is
    yielded from a block with a problem.  ``OSError`` from reading propagates.
    """
    fh.seek(0)
    blocks = _Blocks(fh, block_bytes)
    header = _header(blocks, schema)
    read_options = pcsv.ReadOptions(column_names=header, use_threads=True, block_size=_SUB_BLOCK)
    convert = _convert_options(schema, columns)
    consumed = fh.tell() - blocks.have
    lines_before, rows_before = 1, 0  # the header is line 1
    while True:
        blocks.fill()
        cut = blocks.line_end()
        if blocks.have == 0:
            return
        if cut == 0:
            raise IngestError(
                f"line {lines_before + 1} is longer than {block_bytes} bytes "
                "(lines must end with LF or CRLF)"
            )
        buf = blocks.buf
        nul = buf.find(b"\x00", 0, cut)
        if nul >= 0:
            line = lines_before + buf.count(b"\n", 0, nul) + 1
            raise IngestError(
                f"NUL byte at line {line} (byte offset {consumed + nul}); "
                "this is not a UTF-8 text CSV"
            )
        where = _Where(header, schema, rows_before, lines_before, consumed)
        block = blocks.view[:cut]
        table = _parse(block, read_options, convert, where)
        _check_line_breaks(table, block, where)
        if blocks.eof and buf[cut - 1] != 0x0A:  # the last line has no line end
            _check_last_line(block, buf.rfind(b"\n", 0, cut) + 1, where, table.num_rows)
        rows_before += table.num_rows
        lines_before += buf.count(b"\n", 0, cut)
        consumed += cut
        blocks.drop(cut)
        yield table, consumed


class _Where:
    """Where a block sits in the file, for error messages."""

    def __init__(
        self,
        header: list[str],
        schema: DatasetSchema,
        rows_before: int,
        lines_before: int,
        offset: int = 0,
    ) -> None:
        self.header, self.schema = header, schema
        self.rows_before, self.lines_before = rows_before, lines_before
        self.offset = offset  # file offset of the block
        self.count_empty = len(header) == 1  # an empty line is a row (a null)

    def column(self, field: int) -> str:
        """The column of 0-based field ``field`` of a record, for messages."""
        if field < len(self.header):
            return f"column {q(self.header[field])}"
        return f"field {field + 1} (the header has {len(self.header)} columns)"

    def row(self, spot: _Spot) -> int:
        """The global 1-based data row of a spot found by :func:`_walk` in the block."""
        return self.rows_before + spot.rows + 1

    def place(self, spot: _Spot) -> str:
        """``row R, column "c"`` of a spot found by :func:`_walk` in the block."""
        return f"row {self.row(spot)}, {self.column(spot.field)}"

    def line_of(self, block: memoryview, offset: int) -> int:
        """The 1-based file line holding byte ``offset`` of ``block``."""
        return self.lines_before + bytes(block[:offset]).count(b"\n") + 1


def _parse_options(header: list[str], **kwargs: Any) -> pcsv.ParseOptions:
    """In a one-column file an empty line is a null value, not a line to skip."""
    return pcsv.ParseOptions(ignore_empty_lines=len(header) > 1, **kwargs)


def _parse(
    block: memoryview,
    read_options: pcsv.ReadOptions,
    convert: pcsv.ConvertOptions,
    where: _Where,
) -> pa.Table:
    try:
        return pcsv.read_csv(
            pa.BufferReader(pa.py_buffer(block)),
            read_options=read_options,
            parse_options=_parse_options(where.header),
            convert_options=convert,
        )
    except pa.ArrowInvalid as exc:
        raise _explain(str(exc), block, where, read_options, convert) from None


class _Spot(NamedTuple):
    """A place found by :func:`_walk`: ``rows`` data rows precede its record, which starts
    at byte ``record``; it is in 0-based field ``field``, at byte ``offset``.  For a
    ragged record, ``got`` is its number of fields (and ``offset`` is ``record``)."""

    rows: int
    record: int
    field: int
    offset: int
    got: int = 0


def _walk(
    data: bytes | memoryview,
    *,
    count_empty: bool,
    until: int | None = None,
    fields: int | None = None,
) -> _Spot | None:
    """Read the records of ``data`` (bytes-like, starting at a line start) as pyarrow
    does, and return the first of: a quoted field not closed on its line (``offset`` is
    its opening quote), the field holding byte ``until``, or (if ``fields`` is given) a
    record without exactly ``fields`` fields.  None if there is none of these.  Rows are
    counted as pyarrow counts them (blank lines only if ``count_empty``).

    Error path only: a regular-expression match and a little Python per record.
    """
    pos, rows, end = 0, 0, len(data)
    record_re = _RECORD if fields is None else _record_of(fields)
    while pos < end:
        blank = data[pos] in b"\r\n"
        match = (_RECORD if blank and not count_empty else record_re).match(data, pos)
        if match is None or (until is not None and match.end() > until):
            break
        if count_empty or not blank:
            rows += 1
        pos = match.end()
    else:
        return None
    record, field = pos, 0
    while True:  # the fields of the record at ``pos``
        field_match = _FIELD.match(data, pos)  # always matches, maybe empty
        stop = field_match.end() if field_match else pos
        if until is not None and pos <= until < stop:
            return _Spot(rows, record, field, until)
        if stop < end and data[stop] == 0x22:  # a field opening with a quote did not match
            return _Spot(rows, record, field, stop)
        if stop >= end or data[stop] != 0x2C:  # the record ends (before ``until``)
            if fields is not None and field + 1 != fields:
                return _Spot(rows, record, field, record, got=field + 1)
            return None
        pos, field = stop + 1, field + 1


def _quote_error(
    block: memoryview, where: _Where, spot: _Spot, row: int | None = None
) -> IngestError:
    """The message for a quoted field opened at ``spot`` and not closed on its line."""
    place = where.place(spot) if row is None else f"row {row}, {where.column(spot.field)}"
    line = where.line_of(block, spot.offset)
    return IngestError(
        f"{place}: unterminated quoted field: the quote at line {line} "
        f"(byte offset {where.offset + spot.offset}) {_QUOTE_ADVICE}"
    )


def _check_line_breaks(table: pa.Table, block: memoryview, where: _Where) -> None:
    """Raise if a string value of ``table`` (parsed from ``block``) holds a CR or LF: a
    quote was not closed on its line.  Costs a vectorised scan of the string data."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        if not pa.types.is_string(column.type):
            continue
        first = 0  # table row of the chunk's first value
        for chunk in column.chunks:
            _, offsets, data = chunk.buffers()
            if data is not None and len(chunk):
                at = chunk.offset
                ends = np.frombuffer(offsets, np.int32)[at : at + len(chunk) + 1]
                values = np.frombuffer(data, np.uint8)[ends[0] : ends[-1]]
                if (values <= 0x0D).any() and ((values == 0x0A) | (values == 0x0D)).any():
                    raise _line_break_error(block, where, name, chunk, first)
            first += len(chunk)


def _line_break_error(
    block: memoryview, where: _Where, name: str, chunk: pa.Array, first: int
) -> IngestError:
    """The message for a CR or LF found in a value of column ``name`` (in ``chunk``,
    whose first value is row ``first`` of the block)."""
    spot = _walk(block, count_empty=where.count_empty)
    if spot is not None:
        return _quote_error(block, where, spot)
    # Not found by the walk (not expected): name the row from the parsed values.
    index = pc.index(pc.match_substring_regex(chunk, "[\r\n]"), True).as_py()
    return IngestError(
        f"row {where.rows_before + first + index + 1}, column {q(name)}: a value holds a "
        "line break (CR or LF); line breaks inside quoted values are not supported"
    )


def _check_last_line(block: memoryview, start: int, where: _Where, rows: int) -> None:
    """Raise if a quote opened on the last line of the file, ``block[start:]`` (it has
    no line end), is not closed: pyarrow ends the field at the end of the file without
    complaint.  That line is the last of the ``rows`` rows parsed from ``block``."""
    spot = _walk(block[start:], count_empty=where.count_empty)
    if spot is not None:
        shifted = spot._replace(offset=spot.offset + start)
        raise _quote_error(block, where, shifted, row=where.rows_before + rows)


def _structural_error(block: memoryview, where: _Where) -> tuple[IngestError, int] | None:
    """The first quoted field not closed on its line, or the first byte that is not
    UTF-8, in ``block``: its message and the offset of its record; None if neither."""
    bad: int | None = None
    try:
        codecs.utf_8_decode(block, "strict", True)
    except UnicodeDecodeError as exc:
        bad = exc.start
    spot = _walk(block, count_empty=where.count_empty, until=bad)
    if spot is None:
        return None
    if spot.offset != bad:
        return _quote_error(block, where, spot), spot.record
    return IngestError(
        f"{where.place(spot)}: not valid UTF-8 (byte offset {where.offset + bad}, "
        f"line {where.line_of(block, bad)}); the file must be encoded as UTF-8 (it may "
        "be in another encoding, e.g. Latin-1 or Windows-1252)"
    ), spot.record


def _explain(
    msg: str,
    block: memoryview,
    where: _Where,
    read_options: pcsv.ReadOptions,
    convert: pcsv.ConvertOptions,
) -> IngestError:
    """Turn a pyarrow CSV error in a block into an IngestError naming the global row.

    A quote not closed on its line, or bytes that are not UTF-8, are looked for first:
    pyarrow reports them later in the block, or in another column, than where they are
    (or, for UTF-8, without the row).  The records before such a problem are parsed
    again, so that an earlier ragged row or unparsable value is still the one reported.
    """
    found = _structural_error(block, where)
    if found is not None:
        error, record = found
        if record > 0:
            try:
                _parse(block[:record], read_options, convert, where)
            except IngestError as earlier:
                return earlier
        return error
    header, schema = where.header, where.schema
    if "CSV parse error" in msg:
        # A ragged row (the only parse error left): counted by the walk, as the quote
        # and UTF-8 errors are (pyarrow's row number skips blank lines, per block).
        spot = _walk(block, count_empty=where.count_empty, fields=len(header))
        if spot is not None and spot.got:
            return IngestError(
                f"row {where.row(spot)} (line {where.line_of(block, spot.record)}): "
                f"expected {len(header)} columns, got {spot.got}"
            )
        # Not found by the walk (not expected); pyarrow's message ends with the row's
        # text, which is data: only the reason is kept.
        reason = msg.partition("CSV parse error")[2].strip(": ").partition(":")[0]
        return IngestError(f"malformed CSV: {reason[:120]}")
    match = _CONVERSION_RE.match(msg)
    if match and int(match.group(1)) < len(header):
        name, value = header[int(match.group(1))], match.group(3)
        spec = schema.column(name)
        col = pcsv.read_csv(
            pa.BufferReader(pa.py_buffer(block)),
            read_options=pcsv.ReadOptions(column_names=header, use_threads=True),
            parse_options=_parse_options(header),
            convert_options=pcsv.ConvertOptions(
                include_columns=[name],
                column_types={name: pa.string()},
                strings_can_be_null=True,
                null_values=[""],
                quoted_strings_can_be_null=False,
            ),
        ).column(0)
        index = pc.index(col, value).as_py()
        place = f"column {q(name)}"
        if index >= 0:
            place = f"row {where.rows_before + index + 1}, {place}"
        return IngestError(f"{place}: cannot parse {show(value, spec)} as {spec.type.value}")
    col_match = re.match(r"In CSV column #(\d+): (.*)", msg, re.S)
    if col_match and int(col_match.group(1)) < len(header):
        name = header[int(col_match.group(1))]
        return IngestError(f"column {q(name)}: {col_match.group(2)[:160]}")
    return IngestError(f"cannot read CSV: {msg[:160]}")
