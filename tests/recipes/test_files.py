"""randmask/recipes/files.py: data files as people have them (delimiters, headers, JSON shapes, compression,
encodings) read exactly, and each malformed file refused with its own one-line message naming the fix."""
import bz2
import csv
import gzip
import json
import lzma

import pytest

from randmask.recipes import DataError
from randmask.recipes.files import header_hint, read_table

SMS = "ham\tGo until jurong point, crazy..\nspam\tFree entry in 2 a wkly comp\nham\tOk lar... Joking wif u oni\n"
QUOTED = 'text,label\n"hello, world",1\n"she said ""hi""",0\n"two\nlines, here",1\nplain,0\n'
QUOTED_ROWS = [{"text": "hello, world", "label": "1"}, {"text": 'she said "hi"', "label": "0"},
               {"text": "two\nlines, here", "label": "1"}, {"text": "plain", "label": "0"}]


def write(path, content):
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def csv_module_rows(path, **fmt):
    """The independent expectation: Python's csv module on the plain file."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, **fmt)
        return [dict(row) for row in reader], reader.fieldnames


def test_tsv_without_header_and_the_header_hint(tmp_path):
    path = write(tmp_path / "SMSSpamCollection.tsv", SMS)
    rows, columns = read_table(path, header=False)
    assert columns == ["1", "2"]
    assert rows == [{"1": "ham", "2": "Go until jurong point, crazy.."},
                    {"1": "spam", "2": "Free entry in 2 a wkly comp"},
                    {"1": "ham", "2": "Ok lar... Joking wif u oni"}]
    assert header_hint(columns, rows) == ""

    # Read with a header, the first message becomes the column names: the hint says so and how to fix it.
    rows, columns = read_table(path)
    assert columns == ["ham", "Go until jurong point, crazy.."] and len(rows) == 2
    hint = header_hint(columns, rows)
    assert "looks like data" in hint and "--no-header" in hint and "--text-column 2 --label-column 1" in hint
    assert "\n" not in hint


def test_header_hint_quiet_on_real_headers(tmp_path):
    rows, columns = read_table(write(tmp_path / "d.tsv", "label\ttext\n" + SMS))
    assert columns == ["label", "text"] and len(rows) == 3
    assert header_hint(columns, rows) == ""
    # Prose in the header trips it even when no value repeats it.
    assert "--no-header" in header_hint(["1", "this is a whole sentence of text here"], [{"1": "0"}])


def test_quoted_fields_with_commas_quotes_and_newlines(tmp_path):
    path = write(tmp_path / "q.csv", QUOTED)
    rows, columns = read_table(path)
    assert (rows, columns) == (QUOTED_ROWS, ["text", "label"])
    assert (rows, columns) == csv_module_rows(path)
    # Excel's CRLF line ends, with a CRLF inside a quoted text.
    crlf = write(tmp_path / "crlf.csv", QUOTED.replace("\n", "\r\n"))
    assert read_table(crlf) == csv_module_rows(crlf)
    assert read_table(crlf)[0][2]["text"] == "two\r\nlines, here"


def test_delimiter_sniffed(tmp_path):
    semi = write(tmp_path / "euro.csv", "text;label\nbon, très bon;1\nmauvais;0\nbof, bof, bof;0\n")
    assert read_table(semi) == csv_module_rows(semi, delimiter=";")
    assert read_table(semi)[0][0] == {"text": "bon, très bon", "label": "1"}
    pipe = write(tmp_path / "data.txt", "label|text\n1|good, really\n0|bad; awful\n")
    assert read_table(pipe) == ([{"label": "1", "text": "good, really"}, {"label": "0", "text": "bad; awful"}],
                                ["label", "text"])
    # No extension, tab-separated, texts with a varying number of commas.
    bare = write(tmp_path / "data", "text\tlabel\na, b\t1\nc\t0\n")
    assert read_table(bare)[1] == ["text", "label"]
    # .tsv prefers tab even when ',' also splits every row evenly.
    both = write(tmp_path / "both.tsv", "a\tb,c\n1\t2,3\n")
    assert read_table(both)[1] == ["a", "b,c"]


def test_explicit_delimiter_honored(tmp_path):
    # Both , and tab split every row in two; with no preference by name the tie goes to ','.
    path = write(tmp_path / "tie.txt", "a\tb,c\n1\t2,3\n")
    assert read_table(path) == ([{"a\tb": "1\t2", "c": "3"}], ["a\tb", "c"])
    for spelling in ("tab", "\\t", "\t"):
        assert read_table(path, delimiter=spelling) == ([{"a": "1", "b,c": "2,3"}], ["a", "b,c"])
    assert read_table(path, delimiter=",")[1] == ["a\tb", "c"]


def test_json_shapes(tmp_path):
    records = [{"text": "good", "label": 1}, {"text": "bad", "label": 0, "extra": None}]
    expected = (records, ["text", "label", "extra"])
    jsonl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_table(jsonl) == expected
    assert isinstance(read_table(jsonl)[0][0]["label"], int)
    assert read_table(write(tmp_path / "d.ndjson", jsonl.read_text())) == expected
    assert read_table(write(tmp_path / "list.json", json.dumps(records, indent=2))) == expected
    assert read_table(write(tmp_path / "wrap.json", json.dumps({"data": records}))) == expected
    assert read_table(write(tmp_path / "lines.json", jsonl.read_text())) == expected


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".bz2", bz2.compress),
                                              (".xz", lzma.compress)])
def test_compressed_same_as_plain(tmp_path, suffix, compress):
    plain = read_table(write(tmp_path / "q.csv", QUOTED))
    assert plain[0] == QUOTED_ROWS
    assert read_table(write(tmp_path / f"q.csv{suffix}", compress(QUOTED.encode()))) == plain
    # Magic bytes, not names: a compressed file under a plain name.
    assert read_table(write(tmp_path / f"misnamed{suffix}.csv", compress(QUOTED.encode()))) == plain


def test_gzip_by_content_not_name(tmp_path):
    plain = read_table(write(tmp_path / "q.csv", QUOTED))
    assert read_table(write(tmp_path / "q.csv.gz", QUOTED)) == plain  # not gzip after all: read as it is
    assert read_table(write(tmp_path / "d.jsonl.gz", gzip.compress(b'{"text": "x", "label": 2}\n'))) == (
        [{"text": "x", "label": 2}], ["text", "label"])


def test_encodings(tmp_path):
    bom = write(tmp_path / "bom.csv", b"\xef\xbb\xbf" + QUOTED.encode())
    assert read_table(bom) == (QUOTED_ROWS, ["text", "label"])
    for codec in ("utf-16", "utf-16-be", "utf-32"):
        data = QUOTED.encode(codec) if codec != "utf-16-be" else b"\xfe\xff" + QUOTED.encode(codec)
        assert read_table(write(tmp_path / f"{codec}.csv", data)) == (QUOTED_ROWS, ["text", "label"])
    latin = write(tmp_path / "latin.csv", "text,label\nok,1\ncafé,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 \(byte 0xe9 on line 3\).*--encoding latin-1"):
        read_table(latin)
    assert read_table(latin, encoding="latin-1")[0][1] == {"text": "café", "label": "0"}
    with pytest.raises(DataError, match=r"not ascii \(byte 0xe9 on line 3\).*--encoding"):
        read_table(latin, encoding="ascii")


ZIP = b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 40
MALFORMED = [  # (file name, content, read_table keywords, a distinctive part of the message)
    ("ragged.csv", "text,label\n" + "fine,1\n" * 60 + "a, b,0\n", {}, r"line 62 has 3 fields, the header 2: .*"
     r"unquoted ','\? quote such texts, or give the right --delimiter"),
    ("ragged.tsv", "1\ta\n0\tb\tc\n", {"header": False}, r"line 2 has 3 fields, the first row 2: .*unquoted tab"),
    ("short.csv", "text,label\nfine,1\nalone\n", {}, r"line 3 has 1 field, the header 2: a missing field"),
    ("mixed.txt", "a,b;c\nd;e|f\ng\th,i\n", {}, r"cannot tell its delimiter: .*give it with --delimiter"),
    ("semi-ragged.csv", "text;label\na;1\nb, c;0\nd;e;1\n", {}, r"cannot tell its delimiter"),
    ("single.txt", "just one column\nof text\n", {}, r"single column .*--delimiter"),
    ("empty.csv", "", {}, r"holds no rows: it is empty"),
    ("blank.csv", "\n  \n\n", {}, r"holds no rows: it is empty"),
    ("only-header.csv", "text,label\n", {}, r"holds no rows, only a header: .*--no-header"),
    ("sheet.csv", b"text,label\n\x00\x01\x02binary", {}, r"is binary, not text .*export it as CSV, TSV or JSONL"),
    ("data.zip", ZIP, {}, r"is a zip archive.*unzip it first.*xlsx"),
    ("book.xlsx", ZIP, {}, r"is a zip archive"),
    ("d.csv.zst", b"\x28\xb5\x2f\xfd" + b"\x00" * 20, {}, r"zstd-compressed, which is not supported.*decompress"),
    ("cut.csv.gz", gzip.compress(QUOTED.encode() * 50)[:-30], {}, r"is a truncated or corrupt gzip file"),
    ("cut.csv.xz", lzma.compress(QUOTED.encode() * 50)[:-30], {}, r"is a truncated or corrupt xz file"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", label: 0}\n', {}, r"line 3 is not JSON"),
    ("list.jsonl", '{"text": "a"}\n["b", 0]\n', {}, r"line 2 holds a JSON list, not an object"),
    ("scalar.json", '"hello"', {}, r"holds a JSON string, not a list of records"),
    ("two-keys.json", '{"train": [], "test": []}', {}, r"holds a JSON object, not a list of records"),
    ("pairs.json", '[["a", 1], ["b", 0]]', {}, r"record 1 is a JSON list, not an object"),
    ("broken.json", '[{"text": "a",\n', {}, r"is not JSON \(.* on line 2\)"),
    ("twice.csv", "text,text\na,b\n", {}, r"names column 'text' twice: .*--no-header"),
    ("noname.csv", "text,\na,b\n", {}, r"column 2 of the header \(line 1\) has no name"),
    ("d.csv", QUOTED, {"delimiter": "ab"}, r"--delimiter 'ab' must be one character"),
    ("d.csv", QUOTED, {"encoding": "no-such-codec"}, r"unknown encoding 'no-such-codec': give --encoding"),
]


@pytest.mark.parametrize("name, content, kwargs, match", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_refused_with_its_own_message(tmp_path, name, content, kwargs, match):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=match) as info:
        read_table(str(path), **kwargs)
    message = str(info.value)
    assert message.startswith(repr(str(path))) and "\n" not in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"'.*nope\.csv' does not exist"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"is not a file"):
        read_table(tmp_path)
