"""randmask/recipes/files.py: read a labelled data file as people have it (`randmask finetune --data FILE`).

Formats, chosen by the file name once a .gz / .bz2 / .xz suffix is stripped:

    .jsonl .ndjson    one JSON object per line (blank lines skipped)
    .json             a list of objects, a one-key wrapper {"data": [...]}, or JSON objects one per line
    anything else     delimited text (.csv .tsv .txt, no extension, ...): the delimiter , tab ; or | is
                      detected unless given; the first row names the columns unless header=False

Any of them may be compressed with gzip, bzip2 or xz, recognised by the content's magic bytes, not the name.
Text is UTF-8 (a BOM is dropped) or UTF-16 / UTF-32 with a BOM, unless an encoding is given.
Every failure raises DataError with a one-line message that names the file, the problem and the flag that fixes it.
"""
import bz2
import codecs
import csv
import gzip
import io
import json
import lzma
import os
import zlib
from itertools import islice

from randmask.recipes import DataError

__all__ = ["read_table", "header_hint"]

_COMPRESSIONS = ((b"\x1f\x8b", "gzip", gzip.decompress), (b"BZh", "bzip2", bz2.decompress),
                 (b"\xfd7zXZ\x00", "xz", lzma.decompress))
# UTF-32 first: its little-endian BOM starts with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
_DELIMITERS = (",", "\t", ";", "|")  # also the tie order of detection
_SNIFF_RECORDS = 200
_JSON_KINDS = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
_FIELD_LIMIT = 16 << 20  # csv's default 128 KiB refuses long documents in one field


def read_table(path, *, delimiter: str | None = None, header: bool = True,
               encoding: str | None = None) -> tuple[list[dict], list[str]]:
    """(rows, column names) of a data file: rows are dicts {column: value}, columns in file order.

    Delimited values are strings; with header=False the columns are named "1", "2", ... by position. JSON values
    are kept as they are, and delimiter / header do not apply.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise DataError(f"{name!r} does not exist: check the path given with --data")
    if not os.path.isfile(name):
        raise DataError(f"{name!r} is not a file: give a data file with --data, not a directory")
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"{name!r} cannot be read: {exc.strerror}") from None
    raw = _decompress(name, raw)
    text = _decode(name, raw, encoding)
    if not text.strip():
        raise DataError(f"{name!r} holds no rows: it is empty or blank")
    base = os.path.basename(name).lower()
    for suffix in (".gz", ".bz2", ".xz"):
        base = base.removesuffix(suffix)
    ext = os.path.splitext(base)[1]
    if ext in (".json", ".jsonl", ".ndjson"):
        rows = _read_json(name, text, ext)
        columns = list(dict.fromkeys(k for row in rows[:1000] for k in row))
    else:
        rows, columns = _read_delimited(name, text, ext, delimiter, header)
    if not rows:
        raise DataError(f"{name!r} holds no rows")
    return rows, columns


def header_hint(columns: list[str], rows: list[dict]) -> str:
    """'' or one sentence (to append to a 'no such column' error) when the first row looks like data, not column names.

    Column names "1", "2", ... (header=False) are never data; JSON keys do not trip the tests in practice.
    """
    if not columns or columns == [str(i) for i in range(1, len(columns) + 1)]:
        return ""
    sample = rows[:1000]
    # A label value ("ham") sitting in the header, or a sentence where a name should be.
    prose = any(len(c) > 40 or len(c.split()) > 5 for c in columns)
    if not prose and not any(str(row.get(c, "")).strip() == c for c in columns for row in sample):
        return ""
    shown = ", ".join(repr(c if len(c) <= 24 else c[:21] + "...") for c in columns[:2])
    text = max(range(len(columns)), key=lambda i: len(columns[i]))
    label = 1 if text else 2
    return (f"its first row looks like data, not column names ({shown}): if the file has no header row, add "
            f"--no-header and name the columns by position, e.g. --text-column {text + 1} --label-column {label}")


def _decompress(name: str, raw: bytes) -> bytes:
    for magic, kind, decompress in _COMPRESSIONS:
        if raw.startswith(magic):
            try:
                raw = decompress(raw)
            except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
                raise DataError(f"{name!r} is a truncated or corrupt {kind} file: {exc}; "
                                f"download or compress it again") from None
            break
    if raw.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise DataError(f"{name!r} is a zip archive, not a data file: unzip it first and give the file inside "
                        f"(an .xlsx workbook is a zip too: export the sheet as CSV)")
    if raw.startswith(b"\x28\xb5\x2f\xfd"):
        raise DataError(f"{name!r} is zstd-compressed, which is not supported: decompress it first (zstd -d)")
    return raw


def _decode(name: str, raw: bytes, encoding: str | None) -> str:
    if encoding:
        try:
            enc = codecs.lookup(encoding).name
        except LookupError:
            raise DataError(f"{name!r}: unknown encoding {encoding!r}: give --encoding a name such as utf-8, "
                            f"latin-1, cp1252 or utf-16") from None
    else:
        enc = next((e for bom, e in _BOMS if raw.startswith(bom)), "utf-8")
    # UTF-16/32 text is full of NULs; anything else holding them is a spreadsheet, database or the like.
    if not enc.startswith(("utf-16", "utf-32")) and b"\0" in raw[:65536]:
        raise DataError(f"{name!r} is binary, not text (it holds NUL bytes): export it as CSV, TSV or JSONL")
    try:
        text = raw.decode(enc)
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].decode(enc, errors="replace").count("\n") + 1
        where = f"byte 0x{raw[exc.start]:02x} on line {line}"
        if encoding:
            raise DataError(f"{name!r} is not {encoding} ({where}), the encoding given with --encoding: "
                            f"give its right encoding with --encoding") from None
        raise DataError(f"{name!r} is not {'UTF-8' if enc == 'utf-8' else enc.upper()} ({where}): give its "
                        f"encoding with --encoding, e.g. --encoding latin-1 or --encoding cp1252") from None
    except LookupError as exc:  # a codec that is no text encoding, such as rot13
        raise DataError(f"{name!r}: --encoding {encoding}: {exc}") from None
    return text.removeprefix("\ufeff")


def _read_json(name: str, text: str, ext: str) -> list[dict]:
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # several values: JSON lines under a .json name
                raise DataError(f"{name!r} is not JSON ({exc.msg} on line {exc.lineno}): fix the file, or export "
                                f"it as CSV") from None
        else:
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))
            if not isinstance(data, list):
                raise DataError(f"{name!r} holds a JSON {_kind(data)}, not a list of records: it must hold "
                                f'[{{"text": ..., "label": ...}}, ...], {{"data": [...]}} or one object per line')
            for number, record in enumerate(data, 1):
                if not isinstance(record, dict):
                    raise DataError(f"{name!r}: record {number} is a JSON {_kind(record)}, not an object: "
                                    f'every record must be an object such as {{"text": ..., "label": ...}}')
            return data
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name!r}: line {number} is not JSON ({exc.msg}): each line must hold one JSON "
                            f"object") from None
        if not isinstance(record, dict):
            raise DataError(f"{name!r}: line {number} holds a JSON {_kind(record)}, not an object: "
                            f'each line must hold one object such as {{"text": ..., "label": ...}}')
        rows.append(record)
    return rows


def _kind(value) -> str:
    return _JSON_KINDS.get(type(value), "null")


def _records(text: str, delimiter: str, limit: int | None = None):
    """(line number, fields) of the records but blank lines; newline='' lets csv see quoted newlines and lone CRs."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    return [(reader.line_num, fields) for fields in islice(reader, limit)
            if len(fields) > 1 or "".join(fields).strip()]


def _sniff(name: str, text: str, ext: str) -> str:
    """The delimiter under which every record of the first 200 splits into the same number (>= 2) of fields.

    Tie rule: the extension's own delimiter (',' for .csv, tab for .tsv) when it qualifies; else the one giving the
    most fields, equals going to the first of , tab ; |. When none qualifies, .csv / .tsv fall back to their own if it
    splits the first row, so that the full read names the line that breaks the pattern.
    """
    lengths = {}
    for d in _DELIMITERS:
        try:
            lengths[d] = [len(fields) for _, fields in _records(text, d, _SNIFF_RECORDS)]
        except csv.Error:
            lengths[d] = []
    own = {".csv": ",", ".tsv": "\t"}.get(ext)
    good = [d for d in _DELIMITERS if len(set(lengths[d])) == 1 and lengths[d][0] >= 2]
    if own in good:
        return own
    if good:
        return max(good, key=lambda d: lengths[d][0])  # max() keeps the first of equals
    if own and lengths[own] and lengths[own][0] >= 2:
        return own
    if all(set(lengths[d]) == {1} for d in _DELIMITERS):
        raise DataError(f"{name!r} has a single column (no , tab ; or | between fields), and one column cannot hold "
                        f"both a text and a label: if another character separates them, give it with --delimiter")
    raise DataError(f"{name!r}: cannot tell its delimiter: the rows do not split into the same number of fields by "
                    f", tab ; or | (quote texts that hold the delimiter); give it with --delimiter")


def _read_delimited(name: str, text: str, ext: str, delimiter: str | None, header: bool):
    if delimiter is not None:
        delimiter = {"tab": "\t", "\\t": "\t"}.get(delimiter.lower(), delimiter)
        if len(delimiter) != 1 or delimiter in "\"\r\n":
            raise DataError(f"{name!r}: --delimiter {delimiter!r} must be one character other than a quote or "
                            f"newline, e.g. --delimiter ';' or --delimiter tab")
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
    delimiter = delimiter or _sniff(name, text, ext)
    try:
        records = _records(text, delimiter)
    except csv.Error as exc:
        raise DataError(f"{name!r} cannot be read as delimited text: {exc}; export it again as CSV") from None
    if header:
        line, columns = records.pop(0)
        columns = [c.strip() for c in columns]
        for position, column in enumerate(columns, 1):
            if not column:
                raise DataError(f"{name!r}: column {position} of the header (line {line}) has no name: name every "
                                f"column, or add --no-header and name the columns by position")
            if columns.index(column) != position - 1:
                raise DataError(f"{name!r}: the header names column {column!r} twice: if the first row is data, "
                                f"not column names, add --no-header; else rename one of them")
        if not records:
            raise DataError(f"{name!r} holds no rows, only a header: if that row is data, add --no-header")
    else:
        columns = [str(i) for i in range(1, len(records[0][1]) + 1)]
    shown = "tab" if delimiter == "\t" else repr(delimiter)
    for line, fields in records:
        if len(fields) != len(columns):
            cause = (f"a text holding an unquoted {shown}? quote such texts" if len(fields) > len(columns)
                     else "a missing field, or a quote left open on an earlier line? fix that row")
            raise DataError(f"{name!r}: line {line} has {len(fields)} field{'s' * (len(fields) != 1)}, the "
                            f"{'header' if header else 'first row'} {len(columns)}: {cause}, "
                            f"or give the right --delimiter")
    return [dict(zip(columns, fields)) for _, fields in records], columns
