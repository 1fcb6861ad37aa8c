"""Turn a queued file into clean UTF-8 text for the tokenizer, by its format (name and content).

Follows the queue contract: an optional `#cllm-source <url-or-name> <ISO-8601 time>` first line,
UTF-8 (BOM allowed) or UTF-16 with a BOM, or the encoding an XML/HTML file declares; text, HTML,
JSON, JSON Lines, CSV, TSV and XML, each optionally gzip-compressed. What is not prose (images,
archives, SVG, roff sources, data without words) is refused with the reason.

Memory is bounded by the file's format: plain text is streamed in pieces of at most
PIECE_CHARS characters (two passes over the file: the first checks it and hashes its text, the
second hands the pieces to the tokenizer), whatever its size. HTML, XML, JSON, JSON Lines, CSV
and TSV are parsed whole, so they are held to cllm.layout.WHOLE_DOCUMENT_MAX_BYTES (a parse
needs up to 14x its file size: benchmarks/bench_preprocess_memory.py).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
import logging
import os
import re
import struct
import time
import zlib
import xml.etree.ElementTree as ET
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import msgpack

from cllm.durable import atomic_write
from cllm.layout import FORMATS  # noqa: F401  (the queue contract declares the formats)
from cllm.layout import WHOLE_DOCUMENT_MAX_BYTES  # what a format parsed whole may weigh

log = logging.getLogger(__name__)

DEFAULT_JSON_FIELDS: tuple[str, ...] = ("text", "content", "body")

PROVENANCE = "#cllm-source "
# Plain text beyond this many bytes is streamed (below it, one piece costs less than two passes).
STREAM_MIN_BYTES = 4 * 2**20
READ_BYTES = 2**20          # read (and decompress) a file this much at a time
PIECE_CHARS = 2**20         # the text is handed on in pieces of at most this many characters
GZIP_MAGIC = b"\x1f\x8b"
# Binary formats named in the refusal, so "binary data" says what the file is.
_MAGIC = ((b"%PDF-", "a PDF document"), (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"GIF8", "a GIF image"), (b"PK\x03\x04", "a ZIP archive (or an office document)"),
          (b"\x7fELF", "an ELF executable"), (b"BZh", "bzip2-compressed data"),
          (b"\xfd7zXZ\x00", "xz-compressed data"), (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
          (b"ustar", "a tar archive"))


class PreprocessError(ValueError):
    """The file cannot become training text; the message says why (and where, when known)."""


class Preprocessed:
    """A file's clean text (newlines normalized to \n), its SHA-256 and size, and where it came
    from. The text is held in memory, or for a streamed file read again from the file, piece by
    piece, each time pieces() is iterated; ``on_piece(chars_done)`` hears of every piece."""

    def __init__(self, *, source: str, format: str, source_time: str | None = None,
                 text: str | None = None, sha256: str | None = None, size: int | None = None,
                 chars: int | None = None, stream: Callable[[], Iterator[str]] | None = None):
        if (text is None) == (stream is None):
            raise ValueError("Preprocessed needs its text or a stream of it, not both")
        self.source, self.format, self.source_time = source, format, source_time
        self._text, self._stream = text, stream
        if text is not None:
            raw = text.encode("utf-8", "surrogatepass")
            sha256, size, chars = hashlib.sha256(raw).hexdigest(), len(raw), len(text)
        self.sha256: str = sha256   # of the text in UTF-8
        self.size: int = size       # bytes of the text in UTF-8: tokens <= size (byte-level BPE)
        self.chars: int = chars
        self.streamed = stream is not None
        self.on_piece: Callable[[int], None] | None = None

    def pieces(self) -> Iterator[str]:
        """The text, in pieces of at most PIECE_CHARS characters (cut anywhere: tokenizers
        choose their own cuts)."""
        if self._text is not None:
            chunks: Iterable[str] = (self._text[i:i + PIECE_CHARS]
                                     for i in range(0, len(self._text), PIECE_CHARS))
        else:
            chunks = self._stream()
        done = 0
        for piece in chunks:
            done += len(piece)
            yield piece
            if self.on_piece is not None:
                self.on_piece(done)

    @property
    def text(self) -> str:
        """The whole text (for a streamed file, read in full: for small uses and tests)."""
        return self._text if self._text is not None else "".join(self._stream())

    def head(self, chars: int) -> str:
        """The first `chars` characters, without reading further."""
        if self._text is not None:
            return self._text[:chars]
        out, n = [], 0
        for piece in self._stream():
            out.append(piece[:chars - n])
            n += len(out[-1])
            if n >= chars:
                break
        return "".join(out)

    def __repr__(self) -> str:
        return (f"Preprocessed(source={self.source!r}, format={self.format!r}, chars={self.chars}, "
                f"sha256={self.sha256[:12]}..., streamed={self.streamed})")


def format_of(name: str) -> str:
    """The format chosen by the extension; anything unknown (or none) is plain text."""
    dot = name.rfind(".")
    ext = name[dot:].lower() if dot > 0 else ""
    return FORMATS.get(ext, "text")


def _sniff(name: str, text: str) -> str:
    """The format by name, checked against the content: a file with no known extension is looked
    at (markup, JSON, roff, SVG), and an SVG is refused whatever it is called."""
    fmt = format_of(name)
    head = text.lstrip("\ufeff \t\n")[:4096]
    low = head.lower()
    if name.lower().endswith(".svg") or re.search(r"<svg[\s>]", low[:2048]) and fmt in ("text", "xml"):
        raise PreprocessError("not prose: an SVG image (vector graphics: path data, not text)")
    dot = name.rfind(".")
    if fmt != "text" or (dot > 0 and name[dot:].lower() in FORMATS):
        return fmt
    if re.match(r"(<!--.*?-->\s*)*<!doctype html|<html[\s>]", low, re.S):
        return "html"
    if low.startswith("<?xml") or re.match(r"<!doctype [a-z]|<[a-z][\w:.-]*[\s>/]", low):
        return "xml"
    if head[:1] in "{[":
        try:
            json.loads(text)
            return "json"
        except (ValueError, RecursionError):
            pass
    lines = [ln for ln in head.split("\n")[:200] if ln.strip()]
    roff = sum(1 for ln in lines if re.match(r"\.[A-Za-z]{1,2}(\s|$)|'\\\"|\.\\\"", ln))
    if lines and (lines[0].startswith(("'\\\"", ".\\\"", ".TH ")) or roff >= max(3, len(lines) // 3)):
        raise PreprocessError("not prose: roff source (a man page); feed its rendered text "
                              "(man -P cat NAME > NAME.txt) instead")
    return "text"


_WORDY = re.compile(r"[^\W\d_]")   # a letter of any script


def _check_prose(text: str) -> None:
    """Plain text must read as language: mostly letters, and words (not one endless token)."""
    sample = text[:65536]
    visible = sum(1 for c in sample if not c.isspace())
    if visible < 200:
        return
    letters = len(_WORDY.findall(sample))
    if letters < 0.4 * visible:
        raise PreprocessError(f"not prose: only {100 * letters // visible}% of its characters are "
                              f"letters (numbers, path data or a table?)")
    longest = max((len(t) for t in sample.split()), default=0)
    if longest > 1000:
        raise PreprocessError(f"not prose: a run of {longest} characters without a blank "
                              f"(encoded data such as base64?)")


def gunzip(data: bytes, max_bytes: int) -> bytes:
    """Decompress gzip data (several members allowed), refusing more than ``max_bytes`` out."""
    return b"".join(_gunzip_stream(iter([data]), max_bytes))


def _gunzip_stream(chunks: Iterator[bytes], max_bytes: int) -> Iterator[bytes]:
    """gunzip over a stream of compressed chunks, READ_BYTES out at a time at most."""
    d, size = zlib.decompressobj(16 + zlib.MAX_WBITS), 0
    try:
        for rest in chunks:
            while rest:
                out = d.decompress(rest, min(READ_BYTES, max_bytes + 1 - size))
                size += len(out)
                if size > max_bytes:
                    raise PreprocessError(f"gzip-compressed data larger than {max_bytes} bytes once "
                                          f"decompressed (the queue's size limit)")
                if out:
                    yield out
                rest = d.unconsumed_tail
                if d.eof:
                    rest = d.unused_data
                    if not rest.startswith(GZIP_MAGIC):
                        return   # the end, or trailing garbage after the last member (as gzip does)
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error as e:
        raise PreprocessError(f"gzip-compressed data is corrupt: {e}") from None
    if not d.eof:
        raise PreprocessError("gzip-compressed data is truncated")


def _file_chunks(f: BinaryIO, max_bytes: int) -> Iterator[bytes]:
    """The bytes of `f` from its start, READ_BYTES at a time, decompressed if gzip: never more
    than ``max_bytes`` (a file that grew past the queue's check is refused here)."""
    f.seek(0)

    def raw() -> Iterator[bytes]:
        total = 0
        while True:
            chunk = f.read(READ_BYTES)
            if not chunk:
                return
            total += len(chunk)
            if total > max_bytes:
                raise PreprocessError(f"too large: over the limit of {max_bytes} bytes")
            yield chunk

    chunks = raw()
    first = next(chunks, b"")
    rest = itertools.chain([first], chunks)
    if first.startswith(GZIP_MAGIC):
        rest = _gunzip_stream(rest, max_bytes)
    # The first chunk is at least READ_BYTES (or all there is): BOMs, magics and sniffing see it.
    head = b""
    for chunk in rest:
        head += chunk
        if len(head) >= READ_BYTES:
            break
    if head:
        yield head
    yield from rest


def _name_after_gunzip(name: str) -> str:
    low = name.lower()
    if low.endswith(".gz"):
        return name[:-3]
    return name[:-4] + ".tar" if low.endswith(".tgz") else name


def _refuse_binary(data: bytes) -> None:
    for magic, what in _MAGIC:
        if data.startswith(magic) or (magic == b"ustar" and data[257:262] == magic):
            raise PreprocessError(f"binary data: {what}")


def _whole_document_cap(fmt: str, size: int) -> None:
    if fmt != "text" and size > WHOLE_DOCUMENT_MAX_BYTES:
        raise PreprocessError(
            f"too large for {fmt.upper()}: {size} bytes (over {WHOLE_DOCUMENT_MAX_BYTES // 2**20} MiB); "
            f"HTML, XML, JSON, JSON Lines, CSV and TSV are parsed whole and are limited to "
            f"{WHOLE_DOCUMENT_MAX_BYTES // 2**20} MiB, plain text streams up to the queue's limit")


def preprocess_file(name: str, f: BinaryIO, *,
                    json_fields: Iterable[str] = DEFAULT_JSON_FIELDS,
                    max_bytes: int = 64 * 1024 * 1024,
                    repeats: "RepeatedLines | None" = None,
                    on_piece: Callable[[int], None] | None = None) -> Preprocessed:
    """preprocess() of an open (seekable) file, in bounded memory: plain text larger than
    STREAM_MIN_BYTES is checked and hashed here in one pass (``on_piece(chars_done)`` after each
    piece) and read again by Preprocessed.pieces(); `f` must stay open as long as that is used.
    Other formats are read whole, up to WHOLE_DOCUMENT_MAX_BYTES. The furniture filter
    (`repeats`) sees what is read whole: web pages, not streamed text."""
    f.seek(0)
    if f.read(2) == GZIP_MAGIC:
        name = _name_after_gunzip(name)
    chunks = _file_chunks(f, max_bytes)
    held, size = [], 0
    for chunk in chunks:
        held.append(chunk)
        size += len(chunk)
        if size > STREAM_MIN_BYTES:
            break
    else:
        return _preprocess_plain(name, b"".join(held), json_fields, repeats)
    head = held[0]
    _refuse_binary(head)
    sample = _decode_sample(head[:65536], _declared_encoding(head, format_of(name)))
    body = sample.partition("\n")[2] if sample.startswith(PROVENANCE) else sample
    fmt = _sniff(name, body)
    no_ext = format_of(name) == "text" and not any(name.lower().endswith(e) for e in FORMATS)
    if fmt != "text" or (no_ext and body.lstrip("\ufeff \t\n")[:1] in ("{", "[")):
        # parsed whole: the rest comes in, up to the cap (an extensionless JSON is sniffed whole)
        for chunk in chunks:
            held.append(chunk)
            size += len(chunk)
            _whole_document_cap(fmt, size)
        _whole_document_cap(fmt, size)
        return _preprocess_plain(name, b"".join(held), json_fields, repeats)
    del held, head
    return _stream_text(name, f, max_bytes, on_piece)


def _decode_sample(data: bytes, declared: str | None) -> str:
    """The start of a file as text, for sniffing (a sequence cut at the end is left out)."""
    codec, skip = _codec_of(data, declared)
    try:
        return codecs.getincrementaldecoder(codec)().decode(data[skip:])
    except UnicodeDecodeError:
        return decode(data, declared)   # raises the error a whole decode gives, with its offset


def _stream_text(name: str, f: BinaryIO, max_bytes: int,
                 on_piece: Callable[[int], None] | None) -> Preprocessed:
    """Pass one over a large plain-text file: every check of the whole path (decoding, NULs,
    the provenance line, prose, emptiness), the SHA-256 and size of its text."""
    sha, size, chars, visible = hashlib.sha256(), 0, 0, False
    header: dict = {}
    for piece in _text_pieces(f, max_bytes, header, check=True):
        raw = piece.encode("utf-8", "surrogatepass")
        sha.update(raw)
        size += len(raw)
        chars += len(piece)
        visible = visible or bool(piece.strip())
        if on_piece is not None:
            on_piece(chars)
    if not visible:
        raise PreprocessError("empty after preprocessing: the text is empty or only whitespace")
    digest = sha.hexdigest()

    def again() -> Iterator[str]:
        check = hashlib.sha256()
        for piece in _text_pieces(f, max_bytes, {}, check=False):
            check.update(piece.encode("utf-8", "surrogatepass"))
            yield piece
        if check.hexdigest() != digest:   # written to after it was claimed: try again, whole
            raise RuntimeError(f"{name!r} changed while it was being read")

    return Preprocessed(source=header.get("source") or name, format="text",
                        source_time=header.get("time"), sha256=digest, size=size, chars=chars,
                        stream=again)


def _text_pieces(f: BinaryIO, max_bytes: int, header: dict, check: bool) -> Iterator[str]:
    """The normalized text of a plain-text file, piece by piece, as decode() and preprocess()
    would make it whole. With `check`, also _check_prose on its start, and the provenance line
    parsed into `header` ("source", "time")."""
    chunks = _file_chunks(f, max_bytes)
    decoder = codec = None
    consumed = 0      # bytes of the (decompressed) file before the current chunk
    decoded = 0       # characters decoded before it
    carry = ""        # a trailing \r (it may be half of \r\n), or the text before the first \n
    first_line = True
    sample: list[str] = []
    sampled = 0
    for chunk in itertools.chain(chunks, [None]):
        final = chunk is None
        if decoder is None:
            if final:
                return
            codec, skip = _codec_of(chunk, _declared_encoding(chunk, "text"))
            decoder = codecs.getincrementaldecoder(codec)()
            chunk, consumed = chunk[skip:], skip
        if not final and codec == "utf-8":
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise PreprocessError(f"binary data: NUL byte at offset {consumed + nul}")
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(b"" if final else chunk, final=final)
        except UnicodeDecodeError as e:
            at = consumed - pending + e.start
            bad = (e.object[e.start:e.start + 1] or b"").hex()
            what = codec.upper().removesuffix("-LE").removesuffix("-BE")
            raise PreprocessError(f"not valid {what}: byte 0x{bad} at offset {at} "
                                  f"({e.reason})") from None
        consumed += 0 if final else len(chunk)
        nul = text.find("\0")
        if nul >= 0:
            raise PreprocessError(f"binary data: NUL character at character {decoded + nul}")
        decoded += len(text)
        text = carry + text
        carry = ""
        if not final and text.endswith("\r"):
            text, carry = text[:-1], "\r"
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if first_line:
            if text.startswith(PROVENANCE[:len(text)]) and not final and "\n" not in text \
                    and len(text) < 65536:
                carry = text + carry   # the first line is not whole yet
                continue
            first_line = False
            if text.startswith(PROVENANCE):
                line, _, text = text.partition("\n")
                if check:
                    header["source"], header["time"] = _parse_provenance(line)
        if check and sampled < 65536:
            sample.append(text[:65536 - sampled])
            sampled += len(sample[-1])
            if sampled >= 65536 or final:
                _check_prose("".join(sample))
        for i in range(0, len(text), PIECE_CHARS):
            yield text[i:i + PIECE_CHARS]


def preprocess(name: str, data: bytes, *,
               json_fields: Iterable[str] = DEFAULT_JSON_FIELDS,
               max_bytes: int = 64 * 1024 * 1024,
               repeats: "RepeatedLines | None" = None) -> Preprocessed:
    """Decode, strip the provenance line, extract the text of `data` by its format.

    ``max_bytes`` caps what a gzip-compressed file may decompress to. ``repeats``, when given,
    remembers the lines of earlier documents per site and drops those that repeat across them
    (page furniture that markup alone does not reveal). All of it in memory: preprocess_file
    streams large files.
    """
    if data.startswith(GZIP_MAGIC):
        data = gunzip(data, max_bytes)
        name = _name_after_gunzip(name)
    return _preprocess_plain(name, data, tuple(json_fields), repeats)


def _preprocess_plain(name: str, data: bytes, json_fields: Iterable[str],
                      repeats: "RepeatedLines | None") -> Preprocessed:
    """preprocess() of data already decompressed (`name` without its .gz)."""
    _refuse_binary(data)
    _whole_document_cap(format_of(name), len(data))
    text = decode(data, declared=_declared_encoding(data, format_of(name)))
    fmt = _sniff(name, text.partition("\n")[2] if text.startswith(PROVENANCE) else text)
    _whole_document_cap(fmt, len(data))
    # \r\n (Windows) and lone \r (old Mac) both become \n before anything looks at lines.
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    source, source_time, first_line = name, None, 1
    if text.startswith(PROVENANCE):
        line, _, text = text.partition("\n")
        source, source_time = _parse_provenance(line)
        first_line = 2  # error messages count lines of the file, not of what is left

    if fmt == "text":
        _check_prose(text)
        out = text
    elif fmt == "tsv":
        out = csv_text(text, first_line, delimiter="\t")
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

    if repeats is not None and out.strip():
        out = repeats.filter(source, out)
    if not out.strip():
        what = "the text is empty or only whitespace" if fmt == "text" else \
            f"no text content in the {fmt.upper()}"
        if fmt == "json" or fmt == "jsonl":
            what += f" (no {'/'.join(json_fields)} field and no string of two or more words)"
        raise PreprocessError(f"empty after preprocessing: {what}")
    return Preprocessed(text=out, source=source, format=fmt, source_time=source_time)


_XML_DECL = re.compile(rb"\A(?:\xef\xbb\xbf)?\s*<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")
_META_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?([A-Za-z0-9._-]+)", re.I)


def _declared_encoding(data: bytes, fmt: str) -> str | None:
    """The encoding an XML declaration or an HTML <meta charset> names, if any."""
    head = data[:2048]
    m = _XML_DECL.match(head) or (_META_CHARSET.search(head) if fmt == "html" else None)
    if m is None:
        return None
    label = m.group(1).decode("ascii")
    try:
        return codecs.lookup(label).name
    except LookupError:
        raise PreprocessError(f"the file declares encoding {label!r}, which is unknown") from None


def decode(data: bytes, declared: str | None = None) -> str:
    """UTF-8 (with or without BOM) or UTF-16/32 with a BOM, to str; refuses binary data.
    ``declared``: the encoding the file itself names (XML/HTML), used when it has no BOM."""
    codec, skip = _codec_of(data, declared)
    body = data[skip:]
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


def _codec_of(data: bytes, declared: str | None) -> tuple[str, int]:
    """(codec, BOM length) of data that starts as `data` does."""
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                       (codecs.BOM_UTF8, "utf-8"),
                       (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            return codec, len(bom)
    if declared and declared not in ("utf-8", "utf-16", "utf-32") and b"\0" not in data[:4096]:
        return declared, 0   # UTF-16/32 need their BOM; an ASCII-compatible label is honoured
    return "utf-8", 0


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


_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "param", "source", "track", "wbr"})
# Page furniture: navigation, banners, footers, sidebars, search boxes, and Sphinx's ¶ links.
_FURNITURE_TAGS = frozenset({"nav", "header", "footer", "aside", "menu"})
_FURNITURE_ROLES = frozenset({"navigation", "banner", "contentinfo", "complementary", "search",
                              "menu", "menubar", "toolbar"})
_FURNITURE_CLASS = re.compile(r"(?:^|[\s_-])(?:side-?bar\w*|sphinxsidebar\w*|related|headerlink|"
                              r"breadcrumbs?|navbar|nav|navigation|footer|skip-?link|"
                              r"cookie\w*|share|social)(?:$|[\s_-])", re.I)
_MAIN_HINT = re.compile(r"<main[\s>]|\srole\s*=\s*[\"']?main\b|<article[\s>]", re.I)


def _is_furniture(tag: str, attrs: dict) -> bool:
    if tag in _FURNITURE_TAGS or (attrs.get("role") or "").lower() in _FURNITURE_ROLES:
        return True
    names = f"{attrs.get('class') or ''} {attrs.get('id') or ''}".strip()
    return bool(names) and bool(_FURNITURE_CLASS.search(names))


def _is_main(tag: str, attrs: dict) -> bool:
    return tag in ("main", "article") or (attrs.get("role") or "").lower() == "main"


class _HTMLText(HTMLParser):
    # The output is a list of pieces: ordinary text (blanks collapsed), preformatted text (kept
    # as is) and breaks (1 = new line, 2 = empty line), which are merged when they meet.
    # Open elements are kept on a stack (an end tag closes everything opened inside it, as
    # browsers do with unclosed <p> and <li>), each marked skipped and/or main, so text is kept
    # only outside skipped elements and, when the page has a main region, inside it.

    def __init__(self, main_only: bool = False) -> None:
        super().__init__(convert_charrefs=True)  # entities are decoded inside handle_data
        self.pieces: list[str] = []
        self.pending_break = 0
        self.main_only = main_only
        self.open: list[tuple[str, bool, bool]] = []   # (tag, skipped, main)
        self.skip_depth = 0
        self.main_depth = 0
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

    def _hidden(self) -> bool:
        return bool(self.skip_depth) or (self.main_only and not self.main_depth)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _VOID:
            a = dict(attrs)
            skipped = tag in _SKIP or _is_furniture(tag, a)
            main = _is_main(tag, a)
            self.open.append((tag, skipped, main))
            self.skip_depth += skipped
            self.main_depth += main
            self.pre_depth += tag == "pre"
        if tag in _PARAGRAPH:
            self._break(2)
        elif tag in _LINE:
            self._break(1)
        elif tag in _CELL:
            self._emit_space()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <hr/>: a start without an end. A self-closed <div/> opens nothing.
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if any(t == tag for t, _, _ in self.open):   # a stray end tag closes nothing
            while self.open:
                t, skipped, main = self.open.pop()
                self.skip_depth -= skipped
                self.main_depth -= main
                self.pre_depth -= t == "pre"
                if t == tag:
                    break
        if tag in _PARAGRAPH:
            self._break(2)
        elif tag in _LINE:
            self._break(1)

    def _emit_space(self) -> None:
        if self.pieces and not self.pending_break and not self.pieces[-1].endswith(" "):
            self.pieces.append(" ")

    def handle_data(self, data: str) -> None:
        if self._hidden():
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
    """The page's text without its furniture (navigation, header, footer, sidebars, scripts);
    only its main region (<main>, role="main", <article>) when it has one with text in it."""
    out = ""
    if _MAIN_HINT.search(text):
        out = _html_pass(text, main_only=True)
    return out if out.strip() else _html_pass(text, main_only=False)


def _html_pass(text: str, main_only: bool) -> str:
    parser = _HTMLText(main_only)
    parser.feed(text)
    parser.close()
    # Ordinary text never starts a line with blanks (handle_data strips them); blanks before a
    # line end are layout too, also inside <pre>.
    out = re.sub(r"[ \t]+\n", "\n", "".join(parser.pieces))
    return re.sub(r"\n{3,}", "\n\n", out).strip()


# ------------------------------------------------------------------------ boilerplate across pages


class RepeatedLines:
    """Drops lines that earlier documents of the same site already carried many times: the page
    furniture markup does not mark (a copyright line, "Previous topic", a version picker).

    The site is the host of a document's http(s) source (its provenance line); documents from
    elsewhere pass unchanged. A line is dropped once ``min_pages`` earlier documents of the site
    held it. Memory is bounded: ``max_lines`` line hashes per site (the lines seen once go
    first, then the rarest), ``max_sites`` sites (the least recently seen go first): at most
    max_sites * max_lines * 12 bytes on disk (15 MiB by default).

    With a ``path``, the memory survives restarts: loaded from it, saved to it (atomically,
    checksummed) by save(), at most every ``save_seconds`` unless forced. An unreadable file is
    set aside with a warning: this is a filter's memory, not data.
    """

    FORMAT = "cllmd-furniture"
    VERSION = 1

    def __init__(self, min_pages: int = 4, max_lines: int = 20_000, max_sites: int = 64,
                 path: "os.PathLike | str | None" = None, save_seconds: float = 5.0):
        self.min_pages, self.max_lines, self.max_sites = min_pages, max_lines, max_sites
        self._sites: OrderedDict[str, dict[bytes, int]] = OrderedDict()
        self.path = Path(path) if path is not None else None
        self.save_seconds = save_seconds
        self._dirty = False
        self._saved_at = time.monotonic()
        if self.path is not None:
            self._load()

    @staticmethod
    def site_of(source: str) -> str | None:
        m = re.match(r"https?://([^/?#]+)", source, re.I)
        return m.group(1).lower() if m else None

    def filter(self, source: str, text: str) -> str:
        site = self.site_of(source)
        if site is None:
            return text
        counts = self._sites.pop(site, None)
        if counts is None:
            counts = {}
            while len(self._sites) >= self.max_sites:
                self._sites.popitem(last=False)
        self._sites[site] = counts
        kept, seen = [], set()
        for line in text.split("\n"):
            key = line.strip()
            if not key:
                kept.append(line)
                continue
            h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            if h not in seen:
                seen.add(h)
                if counts.get(h, 0) < self.min_pages:
                    kept.append(line)
            elif counts.get(h, 0) < self.min_pages:
                kept.append(line)
        for h in seen:
            counts[h] = counts.get(h, 0) + 1
        if len(counts) > self.max_lines:   # forget the lines seen once: they are most of them
            for h in [h for h, n in counts.items() if n == 1]:
                del counts[h]
        if len(counts) > self.max_lines:   # then the rarest, down to the bound
            for h in sorted(counts, key=counts.__getitem__)[:len(counts) - self.max_lines]:
                del counts[h]
        self._dirty = self._dirty or bool(seen)
        return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n")

    # ---- persistence: msgpack {format, version, sites: [[site, hashes, counts]]} + CRC-32

    def to_bytes(self) -> bytes:
        sites = [[site, b"".join(counts), struct.pack(f"<{len(counts)}I", *counts.values())]
                 for site, counts in self._sites.items()]
        body = msgpack.packb({"format": self.FORMAT, "version": self.VERSION, "sites": sites})
        return body + struct.pack("<I", zlib.crc32(body))

    def _load(self) -> None:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("furniture memory %s unreadable (%s): starting afresh", self.path, e)
            return
        try:
            body, crc = blob[:-4], blob[-4:]
            if len(blob) < 4 or struct.unpack("<I", crc)[0] != zlib.crc32(body):
                raise ValueError("checksum mismatch (torn or damaged)")
            obj = msgpack.unpackb(body, raw=False)
            if obj.get("format") != self.FORMAT or obj.get("version") != self.VERSION:
                raise ValueError(f"not {self.FORMAT} version {self.VERSION}")
            sites: OrderedDict[str, dict[bytes, int]] = OrderedDict()
            for site, hashes, counts in obj["sites"][-self.max_sites:]:
                n = len(hashes) // 8
                if len(hashes) != 8 * n or len(counts) != 4 * n:
                    raise ValueError(f"site {site!r}: {len(hashes)} hash bytes, {len(counts)} count bytes")
                pairs = zip((hashes[8 * i:8 * i + 8] for i in range(n)), struct.unpack(f"<{n}I", counts))
                sites[str(site)] = dict(sorted(pairs, key=lambda kv: -kv[1])[:self.max_lines])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            aside = self.path.with_name(self.path.name + ".bad")
            log.warning("furniture memory %s set aside as %s and started afresh: %s", self.path,
                        aside.name, e)
            os.replace(self.path, aside)
            return
        self._sites = sites
        log.info("furniture memory: %d site(s), %d line(s) from %s", len(sites),
                 sum(map(len, sites.values())), self.path)

    def save(self, force: bool = False) -> bool:
        """Write the memory to `path` if it changed (and save_seconds have passed since the
        last write, unless `force`); True if written."""
        if self.path is None or not self._dirty:
            return False
        if not force and time.monotonic() - self._saved_at < self.save_seconds:
            return False
        atomic_write(self.path, self.to_bytes())
        self._dirty = False
        self._saved_at = time.monotonic()
        return True


# ------------------------------------------------------------------------------------ JSON


_TWO_WORDS = re.compile(r"[^\W\d_]\w*[^\S\n]+\W*[^\W\d_]")


def _strings(value: Any, fields: tuple[str, ...]) -> Iterator[str]:
    """The text of a JSON value. Strings at the top level or in top-level arrays are text, and a
    record (object) with a text field (``fields``, in order of preference) gives that field's
    strings, all of them. Inside a record without one, only strings of two or more words count:
    single tokens there are values such as types, enum members, ids, URLs and dates (a JSON
    schema is all "object", "string", "#/definitions/x"), not language."""
    # Depth-first, in document order, without recursion: deeply nested input cannot overflow.
    # Each value carries where it sits: "top", inside a "text" field, or in a "record" without one.
    stack: list[tuple[Any, str]] = [(value, "top")]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            if v.strip() and (where != "record" or _TWO_WORDS.search(v)):
                yield v
        elif isinstance(v, list):
            stack.extend((x, where) for x in reversed(v))
        elif isinstance(v, dict):
            # A preferred field that is null or blank does not hide the record's other strings.
            preferred = next((f for f in fields if v.get(f) not in (None, "", [], {})
                              and not (isinstance(v[f], str) and not v[f].strip())), None)
            if preferred is not None:
                stack.append((v[preferred], "text"))
            else:
                inner = "text" if where == "text" else "record"
                stack.extend((x, inner) for x in reversed(list(v.values())))


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


def csv_text(text: str, first_line: int = 1, delimiter: str = ",") -> str:
    """Rows as lines, the cells of the text columns joined by tabs.

    A column is a text column when some cell below the header holds more than a number; with a
    single row every column counts. Numeric-only columns (ids, scores) carry no language.
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, delimiter=delimiter)
    rows: list[list[str]] = []
    try:
        for row in reader:
            rows.append(row)
    except csv.Error as e:
        raise PreprocessError(f"malformed {'TSV' if delimiter == chr(9) else 'CSV'} at line {reader.line_num + first_line - 1}: {e}") from None
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

_ENTITY = re.compile(r"<!ENTITY", re.IGNORECASE)


def xml_text(text: str, first_line: int = 1) -> str:
    """The text nodes, element boundaries as blanks. A DOCTYPE is fine; entity declarations are
    refused (no entity expansion), and expat never fetches an external DTD."""
    m = _ENTITY.search(text)
    if m:
        # Declared entities can expand exponentially ("billion laughs") or read files.
        line = text.count("\n", 0, m.start()) + first_line
        raise PreprocessError(f"XML that declares entities is refused (<!ENTITY on line {line})")
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
