"""Malformed CSV: unterminated quotes, line breaks inside quoted values, stray quotes and
invalid UTF-8 are refused (or read) exactly, at any block size, naming row and column
and never echoing the data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.datasets.ingest import IngestError, iter_validated_batches, read_validated
from sandbox.datasets.keys import new_data_key
from sandbox.datasets.schema import DatasetSchema
from sandbox.datasets.store import write_encrypted_parquet

WriteCsv = Callable[..., Path]
SchemaDict = Callable[..., dict[str, Any]]
HEADER = "id,city,revenue,employees,active,founded,note"
GOOD = "a1,Nanjing,100.5,10,true,2001-02-03,hello"
#: Block sizes: tiny (a few rows per block, quotes near block ends) and the default.
BLOCKS = [64, 200, 8 * 1024 * 1024]

#: One nullable text column: there an empty line is a row (a null), not a blank line.
NOTES_SCHEMA = DatasetSchema.from_dict(
    {
        "name": "notes",
        "title": "Notes",
        "owner_organisation": "test-org",
        "privacy_unit": {"id_column": None},
        "max_rows": 100,
        "columns": [{"name": "text", "type": "str", "nullable": True}],
    }
)

TEXT_SCHEMA = DatasetSchema.from_dict(
    {
        "name": "texts",
        "title": "Texts",
        "owner_organisation": "test-org",
        "privacy_unit": {"id_column": "id", "max_rows_per_unit": 1},
        "max_rows": 10_000,
        "columns": [
            {"name": "id", "type": "int", "classification": "L4"},
            {"name": "text", "type": "str", "nullable": True},
        ],
    }
)
UNTERMINATED = r"unterminated quoted field"


def text_rows(n: int, quoted: bool = False) -> list[str]:
    """Header and ``n`` rows ``i,text i`` (the text quoted if ``quoted``)."""
    return ["id,text"] + [f'{i},"text {i}"' if quoted else f"{i},text {i}" for i in range(1, n + 1)]


def raw(lines: list[str], end: str = "\n") -> bytes:
    return ("\n".join(lines) + end).encode("utf-8")


def read(path: Path, schema: DatasetSchema, block: int) -> pa.Table:
    return pa.Table.from_batches(
        list(iter_validated_batches(path, schema, csv_block_bytes=block)),
        schema=schema.arrow_schema(),
    )


@pytest.mark.parametrize("quoted", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_unterminated_quote_in_999_rows_stores_nothing(
    write_csv: WriteCsv, tmp_path: Path, quoted: bool, block: int
) -> None:
    """The audit's case: row 11 ``11,"broken`` swallowed 988 rows without an error."""
    lines = text_rows(999, quoted)
    lines[11] = '11,"broken'
    source = write_csv([], raw=raw(lines))
    out = tmp_path / "store"
    out.mkdir()
    batches = iter_validated_batches(source, TEXT_SCHEMA, csv_block_bytes=block)
    with pytest.raises(IngestError, match=rf'^row 11, column "text": {UNTERMINATED}') as info:
        write_encrypted_parquet(
            batches, TEXT_SCHEMA.arrow_schema(), out / "v1.sbxenc", new_data_key(),
            dataset_id="d", version=1,
        )  # fmt: skip
    assert "broken" not in str(info.value)
    assert "line 12" in str(info.value)
    assert os.listdir(out) == []


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("end", ["\n", "\r\n", ""])
def test_unterminated_quote_on_the_last_line(write_csv: WriteCsv, block: int, end: str) -> None:
    lines = [*text_rows(30), '31,"never closed']
    data = (end or "\n").join(lines) + end
    with pytest.raises(IngestError, match=rf'^row 31, column "text": {UNTERMINATED}'):
        read(write_csv([], raw=data.encode()), TEXT_SCHEMA, block)


@pytest.mark.parametrize("block", BLOCKS)
def test_quote_opened_in_the_last_field_without_newline(
    small_schema: DatasetSchema, write_csv: WriteCsv, block: int
) -> None:
    path = write_csv([], raw=raw([HEADER, GOOD, 'a2,Wuxi,1,1,true,,"'], end=""))
    with pytest.raises(IngestError, match=rf'^row 2, column "note": {UNTERMINATED}'):
        read(path, small_schema, block)


@pytest.mark.parametrize(
    ("row", "column"),
    [
        ('"a2,Wuxi,1,1,true,,', "id"),  # an L4 column
        ('a2,Wuxi,"1,1,true,,', "revenue"),  # a numeric column: swallows the delimiters
        ('a2,Wuxi,1,1,true,,"x""', "note"),  # a doubled quote, then the line ends
        ('a2,Wuxi,1,1,true,,"x"" y', "note"),
    ],
)
@pytest.mark.parametrize("block", BLOCKS)
def test_unterminated_quote_names_its_column(
    small_schema: DatasetSchema, write_csv: WriteCsv, row: str, column: str, block: int
) -> None:
    lines = [HEADER, GOOD, row, *(GOOD.replace("a1", f"b{i}") for i in range(20))]
    with pytest.raises(IngestError, match=rf'^row 2, column "{column}": {UNTERMINATED}'):
        read(write_csv([], raw=raw(lines)), small_schema, block)


def test_row_numbers_skip_blank_lines(write_csv: WriteCsv) -> None:
    lines = [*text_rows(3), "", "", '4,"oops', "5,fine"]
    with pytest.raises(IngestError, match=rf'^row 4, column "text": {UNTERMINATED}.*line 7'):
        read_validated(write_csv([], raw=raw(lines)), TEXT_SCHEMA)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_line_break_inside_a_quoted_value_is_refused(
    write_csv: WriteCsv, block: int, newline: str
) -> None:
    lines = text_rows(40, quoted=True)
    lines[25] = f'25,"two{newline}lines"'
    with pytest.raises(IngestError, match=r'^row 25, column "text": .*line breaks inside'):
        read(write_csv([], raw=raw(lines)), TEXT_SCHEMA, block)


def test_header_with_unterminated_quote(write_csv: WriteCsv) -> None:
    with pytest.raises(IngestError, match=r"header line.*unterminated quoted field"):
        read_validated(write_csv([], raw=raw(['id,"text', "1,x"])), TEXT_SCHEMA)


def test_one_column_file_counts_empty_lines_as_rows(write_csv: WriteCsv) -> None:
    schema = NOTES_SCHEMA
    path = write_csv([], raw=raw(["text", "a", "", '"b, c"', '"d', "e"]))
    with pytest.raises(IngestError, match=rf'^row 4, column "text": {UNTERMINATED}.*line 5'):
        read_validated(path, schema)


@pytest.mark.parametrize(
    ("earlier", "message"),
    [
        ("a2,Wuxi,1,1,true,,x,extra", r"^row 2 \(line 3\): expected 7 columns, got 8"),
        ("a2,Wuxi,zz,1,true,,x", r"^row 2, column \"revenue\": cannot parse 'zz' as float"),
    ],
)
def test_an_earlier_problem_is_reported_first(
    small_schema: DatasetSchema, write_csv: WriteCsv, earlier: str, message: str
) -> None:
    lines = [HEADER, GOOD, earlier, 'a3,Wuxi,"1,1,true,,x', "a4,Wuxi,1,1,true,,x"]
    with pytest.raises(IngestError, match=message):
        read_validated(write_csv([], raw=raw(lines)), small_schema)


@pytest.mark.parametrize("block", BLOCKS)
def test_quotes_commas_and_stray_quotes_are_read_exactly(write_csv: WriteCsv, block: int) -> None:
    values = {
        '"a, b"': "a, b",
        '"say ""hi"""': 'say "hi"',
        '""""': '"',
        '""': "",
        "": None,
        'ab"c': 'ab"c',  # a quote inside an unquoted field is an ordinary character
        '5"': '5"',
        '"x,""y"",z"': 'x,"y",z',
    }
    lines = ["id,text"] + [f"{i},{v}" for i, v in enumerate(values, 1)]
    table = read(write_csv([], raw=raw(lines)), TEXT_SCHEMA, block)
    assert table.column("text").to_pylist() == list(values.values())


# -- invalid UTF-8 -------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize(
    ("field", "column"), [(6, "note"), (3, "employees"), (0, "id"), (1, "city")]
)
def test_invalid_utf8_names_row_column_and_offset(
    small_schema: DatasetSchema, write_csv: WriteCsv, block: int, field: int, column: str
) -> None:
    good = [GOOD.replace("a1", f"b{i}") for i in range(1, 30)]
    cells = ["a2", "Wuxi", "1", "1", "true", "", "note"]
    cells[field] = "Caf\xe9"
    bad = ",".join(cells).encode("latin-1")
    data = raw([HEADER, *good]) + bad + b"\n" + raw(good[:5]).replace(b"b", b"c")
    offset = data.index(b"\xe9")
    with pytest.raises(
        IngestError,
        match=rf'^row 30, column "{column}": not valid UTF-8 \(byte offset {offset}, line 31\)',
    ) as info:
        read(write_csv([], raw=data), small_schema, block)
    assert "Caf" not in str(info.value)


def test_invalid_utf8_in_the_header(write_csv: WriteCsv) -> None:
    data = b"id,t\xe9xt\n1,x\n"
    with pytest.raises(IngestError, match=r"header line is not valid UTF-8 \(byte offset 4\)"):
        read_validated(write_csv([], raw=data), TEXT_SCHEMA)


def test_invalid_utf8_after_a_quoted_comma(write_csv: WriteCsv) -> None:
    data = raw(["id,text", '1,"a,b"']) + b'2,"x,\xff"\n'
    with pytest.raises(IngestError, match=r'^row 2, column "text": not valid UTF-8'):
        read_validated(write_csv([], raw=data), TEXT_SCHEMA)


# -- property: pyarrow's own writer round-trips ---------------------------------------

_CHARS = st.sampled_from([*"ab ,\"'é中\t;"])
_PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
_TEXTS = st.lists(st.none() | st.text(_CHARS, max_size=12), min_size=1, max_size=40)


def write_texts(path: Path, texts: list[str | None]) -> pa.Table:
    """Write ``id, text`` rows with ``pyarrow.csv.write_csv`` (strings quoted, quotes
    doubled, nulls as empty unquoted fields)."""
    table = pa.table(
        {"id": pa.array(range(1, len(texts) + 1), pa.int64()), "text": pa.array(texts, pa.string())}
    )
    pcsv.write_csv(table, path)
    return table


@_PROPERTY
@given(texts=_TEXTS, block=st.sampled_from([48, 97, 4096]))
def test_written_by_pyarrow_round_trips(
    tmp_path: Path, texts: list[str | None], block: int
) -> None:
    """Any strings (quotes, commas, tabs, non-ASCII) written by pyarrow read back exactly,
    whatever the block size."""
    path = tmp_path / "p.csv"
    table = write_texts(path, texts)
    result = read(path, TEXT_SCHEMA, block)
    assert result.column("id").to_pylist() == table.column("id").to_pylist()
    assert result.column("text").to_pylist() == texts


@_PROPERTY
@given(
    texts=_TEXTS,
    where=st.integers(0, 39),
    cut=st.integers(0, 12),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    block=st.sampled_from([48, 97, 4096]),
)
def test_line_break_in_a_value_is_refused_at_its_row(
    tmp_path: Path, texts: list[str | None], where: int, cut: int, newline: str, block: int
) -> None:
    """A value with a line break, quoted by pyarrow's writer, is refused at its row: the
    rows are never silently split or merged."""
    row = where % len(texts)
    text = texts[row] or ""
    texts[row] = text[:cut] + newline + text[cut:]
    path = tmp_path / "p.csv"
    write_texts(path, texts)
    with pytest.raises(IngestError, match=rf'^row {row + 1}, column "text": {UNTERMINATED}'):
        read(path, TEXT_SCHEMA, block)


# -- ragged rows, blank lines and line ends (catalogue item 58) -----------------------

RAGGED_SCHEMA = DatasetSchema.from_dict(
    {
        "name": "ragged",
        "title": "Ragged",
        "owner_organisation": "test-org",
        "privacy_unit": {"id_column": None},
        "max_rows": 10_000,
        "columns": [
            {"name": "id", "type": "int", "bounds": [0, 10_000]},
            {"name": "n", "type": "int", "bounds": [0, 10_000]},
            {"name": "text", "type": "str", "nullable": True},
        ],
    }
)
#: Block sizes for the small ragged files: the bad row in the first block, in a later
#: one, right after the blank lines, and the defaults.
RAGGED_BLOCKS = [12, 14, 16, 20, 24, 32, *BLOCKS]


@pytest.mark.parametrize("block", RAGGED_BLOCKS)
def test_ragged_row_after_blank_lines_names_its_data_row_and_line(
    write_csv: WriteCsv, block: int
) -> None:
    """The reviewer's case: blank lines are not rows, but they are lines."""
    path = write_csv([], raw=b"id,n,text\n1,1,a\n\n\n2,2,b,X\n")
    with pytest.raises(IngestError, match=r"^row 2 \(line 5\): expected 3 columns, got 4$"):
        read(path, RAGGED_SCHEMA, block)


def ragged_file(end: str, bad: str) -> tuple[bytes, int, int]:
    """40 rows of ``id,text`` with blank lines before and after row 23, which is ``bad``:
    the file, and that row's data-row number and line."""
    lines = ["id,text"]
    for i in range(1, 41):
        if i in (3, 10, 23, 24, 31):
            lines += ["", ""] if i == 23 else [""]
        lines.append(bad if i == 23 else f'{i},"text, {i}"')
    return (end.join(lines) + end + end).encode(), 23, lines.index(bad) + 1


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("end", ["\n", "\r\n"])
@pytest.mark.parametrize(
    ("bad", "got"), [('23,"a,b",x', 3), ("23,x,y,z", 4), ("23", 1), ('"23, x"', 1)]
)
def test_ragged_row_between_blank_lines(
    write_csv: WriteCsv, block: int, end: str, bad: str, got: int
) -> None:
    data, row, line = ragged_file(end, bad)
    assert line == 28  # the header, 22 rows and 4 blank lines before it
    with pytest.raises(
        IngestError, match=rf"^row {row} \(line {line}\): expected 2 columns, got {got}$"
    ):
        read(write_csv([], raw=data), TEXT_SCHEMA, block)


@pytest.mark.parametrize("block", BLOCKS)
def test_ragged_row_in_a_one_column_file_counts_empty_lines(
    write_csv: WriteCsv, block: int
) -> None:
    """In a one-column file an empty line is a row (a null), so it is counted."""
    schema = NOTES_SCHEMA
    path = write_csv([], raw=raw(["text", "a", "", "", '"b, c"', "d,e", "f"]))
    with pytest.raises(IngestError, match=r"^row 5 \(line 6\): expected 1 columns, got 2$"):
        read(path, schema, block)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("end", ["\n", "\r\n"])
def test_unparsable_value_after_blank_lines(write_csv: WriteCsv, block: int, end: str) -> None:
    data, _, _ = ragged_file(end, "23,fine")
    data = data.replace(b'\n30,"text', b'\nzz,"text')
    with pytest.raises(IngestError, match=r'^row 30, column "id": cannot parse'):
        read(write_csv([], raw=data), TEXT_SCHEMA, block)


@pytest.mark.parametrize("block", BLOCKS)
def test_nul_byte_after_blank_lines_names_its_line(write_csv: WriteCsv, block: int) -> None:
    data, _, line = ragged_file("\r\n", "23,n\x00l")
    with pytest.raises(IngestError, match=rf"^NUL byte at line {line} \(byte offset"):
        read(write_csv([], raw=data), TEXT_SCHEMA, block)


_RAGGED_TEXTS = st.lists(st.text(_CHARS, max_size=10), min_size=1, max_size=30)


@_PROPERTY
@given(
    texts=_RAGGED_TEXTS,
    blanks=st.lists(st.integers(0, 3), min_size=31, max_size=31),
    where=st.integers(0, 29),
    extra=st.sampled_from([("", 1), (',"x,y"', 3), (",z,", 4), (",,", 4)]),
    end=st.sampled_from(["\n", "\r\n"]),
    block=st.integers(64, 400) | st.just(8 * 1024 * 1024),
)
def test_ragged_row_is_named_by_data_row_and_line(
    tmp_path: Path,
    texts: list[str],
    blanks: list[int],
    where: int,
    extra: tuple[str, int],
    end: str,
    block: int,
) -> None:
    """A valid CSV with blank lines anywhere and one row made ragged (a field too few or
    one or more too many): the error names that row's data-row number (blank lines not
    counted) and its physical line, whatever the block size."""
    bad, (tail, got) = where % len(texts), extra
    lines = ["id,text"]
    for i, text in enumerate(texts):
        lines += [""] * blanks[i]
        value = '"' + text.replace('"', '""') + '"'
        lines.append(f"{i + 1}" if i == bad and not tail else f"{i + 1},{value}")
        if i == bad:
            lines[-1] += tail
            line = len(lines)
    lines += [""] * blanks[-1]
    path = tmp_path / "p.csv"
    path.write_bytes((end.join(lines) + end).encode())
    with pytest.raises(
        IngestError, match=rf"^row {bad + 1} \(line {line}\): expected 2 columns, got {got}$"
    ):
        read(path, TEXT_SCHEMA, block)
