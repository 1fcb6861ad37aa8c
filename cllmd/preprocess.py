"""Turn a queued file into clean UTF-8 text for the tokenizer, by its format (file extension).

Follows the queue contract: an optional `#cllm-source <url-or-name> <ISO-8601 time>` first line,
UTF-8 (BOM allowed) or UTF-16 with a BOM; text, HTML, JSON, JSON Lines, CSV and XML.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from html.parser import HTMLParser
from typing import Any, Iterable, Iterator

DEFAULT_JSON_FIELDS: tuple[str, ...] = ("text", "content", "body")

FORMATS: dict[str, str] = {
    ".txt": "text", ".md": "text", ".rst": "text", ".text": "text",
    ".html": "html", ".htm": "html",
    ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv", ".xml": "xml",
}
PROVENANCE = "#cllm-source "


class PreprocessError(ValueError):
    """The file cannot become training text; the message says why (and where, when known)."""


@dataclass(frozen=True)
class Preprocessed:
    text: str  # clean text, newlines normalized to \n
    source: str  # the provenance URL/name, else the file's name
    format: str  # "text" | "html" | "json" | "jsonl" | "csv" | "xml"
    source_time: str | None = None  # the provenance line's timestamp, as written


def format_of(name: str) -> str:
    """The format chosen by the extension; anything unknown (or none) is plain text."""
    dot = name.rfind(".")
    ext = name[dot:].lower() if dot > 0 else ""
    return FORMATS.get(ext, "text")


def preprocess(name: str, data: bytes, *,
               json_fields: Iterable[str] = DEFAULT_JSON_FIELDS) -> Preprocessed:
    """Decode, strip the provenance line, extract the text of `data` by the format of `name`."""
    fmt = format_of(name)
    text = decode(data)
    # \r\n (Windows) and lone \r (old Mac) both become \n before anything looks at lines.
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    source, source_time, first_line = name, None, 1
    if text.startswith(PROVENANCE):
        line, _, text = text.partition("\n")
        source, source_time = _parse_provenance(line)
        first_line = 2  # error messages count lines of the file, not of what is left

    if fmt == "text":
        out = text
    elif fmt == "html":
        out = html_text(text)
    elif fmt == "json":
        out = json_text(text, tuple(json_fields), first_line)
    elif fmt == "jsonl":
        out = jsonl_text(text, tuple(json_fields), first_line)
    elif fmt == "csv":
        out = csv_text(text, first_line)
    else:
        out = xml_text(text, first_line)

    if not out.strip():
        what = "the text is empty or only whitespace" if fmt == "text" else \
            f"no text content in the {fmt.upper()}"
        raise PreprocessError(f"empty after preprocessing: {what}")
    return Preprocessed(text=out, source=source, format=fmt, source_time=source_time)


def decode(data: bytes) -> str:
    """UTF-8 (with or without BOM) or UTF-16/32 with a BOM, to str; refuses binary data."""
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                       (codecs.BOM_UTF8, "utf-8"),
                       (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            body, skip = data[len(bom):], len(bom)
            break
    else:
        body, skip, codec = data, 0, "utf-8"

    if codec == "utf-8":
        nul = body.find(b"\0")
        if nul >= 0:
            raise PreprocessError(f"binary data: NUL byte at offset {nul + skip}")
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as e:
        bad = body[e.start:e.start + 1]
        name = codec.upper().removesuffix("-LE").removesuffix("-BE")
        raise PreprocessError(f"not valid {name}: byte 0x{bad.hex()} at offset {e.start + skip} "
                              f"({e.reason})") from None
    nul = text.find("\0")
    if nul >= 0:
        raise PreprocessError(f"binary data: NUL character at character {nul}")
    return text


def _parse_provenance(line: str) -> tuple[str, str]:
    parts = line[len(PROVENANCE):].split()
    if len(parts) != 2:
        raise PreprocessError("malformed provenance line 1: expected "
                              f"'#cllm-source <url-or-name> <ISO-8601 time>', got {line[:200]!r}")
    source, when = parts
    try:
        datetime.fromisoformat(when)
    except ValueError:
        raise PreprocessError(f"malformed provenance line 1: {when!r} is not an ISO-8601 time") from None
    return source, when


_SPACES = re.compile(r"[ \t\f\v\u00a0]+")


def tidy_lines(text: str) -> str:
    """Collapse runs of blanks inside lines, strip lines, allow at most one empty line in a row."""
    out: list[str] = []
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip("\n")


# ------------------------------------------------------------------------------------ HTML

_SKIP = frozenset({"script", "style", "noscript", "template"})
# Paragraph-like blocks are set apart by an empty line, the others by a line break.
_PARAGRAPH = frozenset({
    "address", "article", "aside", "blockquote", "dl", "fieldset", "figure", "footer", "form",
    "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "main", "nav", "ol", "p", "pre",
    "section", "table", "title", "ul",
})
_LINE = frozenset({
    "br", "caption", "dd", "details", "dialog", "div", "dt", "figcaption", "legend", "li",
    "option", "summary", "tr", "body", "head", "html",
})
_CELL = frozenset({"td", "th"})


class _HTMLText(HTMLParser):
    # The output is a list of pieces: ordinary text (blanks collapsed), preformatted text (kept
    # as is) and breaks (1 = new line, 2 = empty line), which are merged when they meet.

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities are decoded inside handle_data
        self.pieces: list[str] = []
        self.pending_break = 0
        self.skip_depth = 0
        self.pre_depth = 0

    def _break(self, n: int) -> None:
        self.pending_break = max(self.pending_break, n)

    def _emit(self, s: str) -> None:
        if not s:
            return
        if self.pending_break and self.pieces:
            self.pieces.append("\n" * self.pending_break)
        self.pending_break = 0
        self.pieces.append(s)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip_depth += 1
        elif tag == "pre":
            self.pre_depth += 1
        if tag in _PARAGRAPH:
            self._break(2)
        elif tag in _LINE:
            self._break(1)
        elif tag in _CELL:
            self._emit_space()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <hr/>: a start without an end. A self-closed <script/> would never be closed.
        if tag not in _SKIP and tag != "pre":
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in _PARAGRAPH:
            self._break(2)
        elif tag in _LINE:
            self._break(1)

    def _emit_space(self) -> None:
        if self.pieces and not self.pending_break and not self.pieces[-1].endswith(" "):
            self.pieces.append(" ")

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        if self.pre_depth:
            self._emit(data)
            return
        collapsed = re.sub(r"\s+", " ", data)
        if collapsed == " ":
            self._emit_space()
        elif collapsed:
            if self.pending_break or not self.pieces or self.pieces[-1].endswith((" ", "\n")):
                collapsed = collapsed.lstrip(" ")
            self._emit(collapsed)


def html_text(text: str) -> str:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    # Ordinary text never starts a line with blanks (handle_data strips them); blanks before a
    # line end are layout too, also inside <pre>.
    out = re.sub(r"[ \t]+\n", "\n", "".join(parser.pieces))
    return re.sub(r"\n{3,}", "\n\n", out).strip()


# ------------------------------------------------------------------------------------ JSON


def _strings(value: Any, fields: tuple[str, ...]) -> Iterator[str]:
    # Depth-first, in document order, without recursion: deeply nested input cannot overflow.
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if v.strip():
                yield v
        elif isinstance(v, list):
            stack.extend(reversed(v))
        elif isinstance(v, dict):
            # A preferred field that is null or blank does not hide the record's other strings.
            preferred = next((f for f in fields if v.get(f) not in (None, "", [], {})
                              and not (isinstance(v[f], str) and not v[f].strip())), None)
            stack.extend(reversed([v[preferred]] if preferred is not None else list(v.values())))


def _loads(text: str, what: str, line_offset: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PreprocessError(
            f"malformed {what}: {e.msg} at line {e.lineno + line_offset} column {e.colno}") from None
    except RecursionError:
        raise PreprocessError(f"malformed {what}: nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
        raise PreprocessError(f"malformed {what}: {e}") from None


def json_text(text: str, fields: tuple[str, ...], first_line: int = 1) -> str:
    return "\n".join(_strings(_loads(text, "JSON", first_line - 1), fields))


def jsonl_text(text: str, fields: tuple[str, ...], first_line: int = 1) -> str:
    out: list[str] = []
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise PreprocessError(
                f"malformed JSON Lines: line {first_line + i}: {e.msg} at column {e.colno}") from None
        except (RecursionError, ValueError) as e:
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise PreprocessError(f"malformed JSON Lines: line {first_line + i}: {reason}") from None
        out.extend(_strings(value, fields))
    return "\n".join(out)


# ------------------------------------------------------------------------------------- CSV

_NUMERIC = re.compile(r"[-+]?(\d[\d,_]*)?(\.\d+)?([eE][-+]?\d+)?%?")


def _is_texty(cell: str) -> bool:
    cell = cell.strip()
    return bool(cell) and not _NUMERIC.fullmatch(cell)


def csv_text(text: str, first_line: int = 1) -> str:
    """Rows as lines, the cells of the text columns joined by tabs.

    A column is a text column when some cell below the header holds more than a number; with a
    single row every column counts. Numeric-only columns (ids, scores) carry no language.
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[list[str]] = []
    try:
        for row in reader:
            rows.append(row)
    except csv.Error as e:
        raise PreprocessError(f"malformed CSV at line {reader.line_num + first_line - 1}: {e}") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        return ""
    width = max(len(r) for r in rows)
    body = rows[1:] or rows
    keep = [j for j in range(width) if any(j < len(r) and _is_texty(r[j]) for r in body)]
    lines = []
    for r in rows:
        cells = [" ".join(r[j].split()) for j in keep if j < len(r)]
        line = "\t".join(c for c in cells if c)
        if line:
            lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- XML

_DTD = re.compile(r"<!(DOCTYPE|ENTITY)", re.IGNORECASE)


def xml_text(text: str, first_line: int = 1) -> str:
    """The text nodes, element boundaries as blanks; DTDs are refused (no entity expansion)."""
    m = _DTD.search(text)
    if m:
        # A DTD can declare entities that expand exponentially ("billion laughs") or read files.
        line = text.count("\n", 0, m.start()) + first_line
        raise PreprocessError(f"XML with a DTD is refused (<!{m.group(1).upper()} on line {line})")
    # expat decodes from bytes itself; handing it UTF-8 bytes with the declaration removed keeps a
    # declared encoding="..." from contradicting the text we already decoded.
    body = re.sub(r"\A\s*<\?xml[^>]*\?>", lambda m: "\n" * m.group(0).count("\n"), text)
    parser = ET.XMLParser()
    try:
        parser.feed(body.encode("utf-8"))
        root = parser.close()
    except ET.ParseError as e:
        line, col = e.position
        msg = str(e).split(":")[0]
        raise PreprocessError(f"malformed XML: {msg} at line {line + first_line - 1} column {col + 1}") from None

    pieces: list[str] = []
    # Iterative walk: ("el", element) visits, ("text", s) emits. Children of a container (an
    # element with no text of its own between them) go on lines of their own; in mixed content
    # (<p>Hello <b>w</b>!</p>) the text already carries its own spacing.
    stack: list[tuple[str, Any]] = [("el", root)]
    while stack:
        kind, item = stack.pop()
        if kind == "text":
            if item:
                pieces.append(item)
            continue
        children = list(item)
        mixed = bool((item.text or "").strip()) or any((c.tail or "").strip() for c in children)
        sep = "" if mixed else "\n"
        todo: list[tuple[str, Any]] = [("text", item.text)]
        for child in children:
            todo += [("text", sep), ("el", child), ("text", sep), ("text", child.tail)]
        stack.extend(reversed(todo))
    # Nested containers stack their line breaks; XML has no paragraphs, so empty lines go.
    return "\n".join(line for line in tidy_lines("".join(pieces)).split("\n") if line)
