"""Preprocessing of queued files by format, encoding and provenance line."""

import codecs
import gzip
import hashlib
import io
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cllmd.preprocess import PreprocessError, format_of, preprocess, preprocess_file


def text_of(name, data, **kw):
    return preprocess(name, data, **kw).text


@pytest.mark.parametrize("name, fmt", [
    ("a.txt", "text"), ("README", "text"), ("notes.MD", "text"), ("x.rst", "text"),
    ("x.text", "text"), ("weird.log", "text"), (".hidden", "text"), ("p.HTML", "html"),
    ("p.htm", "html"), ("d.json", "json"), ("d.jsonl", "jsonl"), ("d.ndjson", "jsonl"),
    ("t.csv", "csv"), ("x.xml", "xml"),
])
def test_format_of_by_extension(name, fmt):
    assert format_of(name) == fmt


def test_preprocess_plain_text_normalizes_newlines_only():
    pre = preprocess("a.txt", b"  indented\r\nline two\rthree\n\n\nend  ")
    assert (pre.text, pre.source, pre.format, pre.source_time) == (
        "  indented\nline two\nthree\n\n\nend  ", "a.txt", "text", None)


def test_preprocess_provenance_line_sets_source():
    data = b"#cllm-source https://example.org/a.html 2026-11-26T07:00:00Z\n<p>Hi</p>"
    pre = preprocess("a.html", data)
    assert (pre.text, pre.source, pre.source_time) == (
        "Hi", "https://example.org/a.html", "2026-11-26T07:00:00Z")


@pytest.mark.parametrize("line", [
    b"#cllm-source https://example.org/a\nx",  # no time
    b"#cllm-source a b 2026-11-26T07:00:00Z\nx",  # a space in the source
    b"#cllm-source https://example.org/a yesterday\nx",  # not ISO-8601
])
def test_preprocess_refuses_malformed_provenance(line):
    with pytest.raises(PreprocessError, match="malformed provenance line 1"):
        preprocess("a.txt", line)


def test_preprocess_encodings_bom_and_utf16():
    assert text_of("a.txt", codecs.BOM_UTF8 + "café".encode()) == "café"
    for enc in ("utf-16", "utf-16-be"):
        data = "#cllm-source s 2026-01-01T00:00:00Z\r\nZürich\r\n".encode(enc)
        if enc == "utf-16-be":
            data = codecs.BOM_UTF16_BE + data
        pre = preprocess("a.txt", data)
        assert (pre.text, pre.source) == ("Zürich\n", "s")


def test_preprocess_refuses_binary_and_undecodable():
    with pytest.raises(PreprocessError, match=r"binary data: NUL byte at offset 8"):
        preprocess("img.txt", b"\x88PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(PreprocessError, match=r"binary data: a PNG image"):
        preprocess("img.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(PreprocessError,
                       match=r"not valid UTF-8: byte 0xe9 at offset 3 \(invalid continuation byte\)"):
        preprocess("latin1.txt", "café au lait".encode("latin-1"))
    with pytest.raises(PreprocessError, match=r"not valid UTF-16"):
        preprocess("bad16.txt", codecs.BOM_UTF16_LE + b"\x00\xd8a\x00")  # lone surrogate


@pytest.mark.parametrize("name, data", [
    ("e.txt", b""), ("w.txt", b" \n\t\r\n"), ("s.html", b"<script>x()</script><p> </p>"),
    ("n.json", b'{"n": 1, "ok": true}'), ("c.csv", b"id,score\n1,2\n3,4.5\n"), ("x.xml", b"<r><a/></r>"),
    ("p.txt", b"#cllm-source s 2026-01-01T00:00:00Z\n"),
])
def test_preprocess_refuses_empty_results(name, data):
    with pytest.raises(PreprocessError, match="empty after preprocessing"):
        preprocess(name, data)


def test_preprocess_html_blocks_entities_and_dropped_elements():
    html = b"""<!doctype html><html><head><title>T &amp; t</title>
<style>p { color: red }</style><script>var s = "<p>no</p>";</script></head>
<body><h1>Head  line</h1><p>Hello <b>bold</b>
   world,&nbsp;caf&eacute; &#8212; &lt;tag&gt;.</p><div>a<br>b<br/>c</div>
<ul><li>one</li><li>two</li></ul><pre>  code
    indented</pre><table><tr><td>x</td><td>y</td></tr><tr><td>z</td><td>w</td></tr></table>
<noscript>enable js</noscript><template><p>tpl</p></template>tail<!-- comment --></body></html>"""
    assert text_of("p.html", html) == (
        "T & t\n\nHead line\n\nHello bold world, café \u2014 <tag>.\n\na\nb\nc\n\none\ntwo\n\n"
        "  code\n    indented\n\nx y\nz w\n\ntail")


def test_preprocess_json_prefers_text_fields():
    data = b'''[{"id": 1, "title": "ignored", "text": "first doc"},
               {"title": "no text field", "tags": ["a", "b"], "n": 3},
               {"content": {"nested": "deep"}}, "bare string"]'''
    assert text_of("d.json", data) == "first doc\nno text field\ndeep\nbare string"
    assert text_of("d.json", b'{"body": "b", "title": "t"}', json_fields=("title",)) == "t"
    assert text_of("d.json", b'{"text": null, "content": " ", "title": "a title"}') == "a title"


def test_preprocess_jsonl_each_line():
    data = b'{"text": "one"}\n\n{"content": "two", "x": "y"}\r\n["three", 4]\n'
    assert text_of("d.jsonl", data) == "one\ntwo\nthree"


@pytest.mark.parametrize("name, data, message", [
    ("d.json", b'{"a": 1,\n "b": }', r"malformed JSON: Expecting value at line 2 column 7"),
    ("d.json", b"[" * 100_000, r"malformed JSON: nested too deeply"),
    ("p.json", b'#cllm-source s 2026-01-01T00:00:00Z\n{"a":\n}',
     r"malformed JSON: Expecting value at line 3 column 1"),  # lines counted in the file
    ("d.jsonl", b'{"text": "ok"}\n{"text": nope}\n', r"malformed JSON Lines: line 2: Expecting value"),
    ("t.csv", b'a,b\n1,"x"y\n', r"malformed CSV at line 2: ',' expected after '\"'"),
    ("x.xml", b"<r>\n<a></b>\n</r>", r"malformed XML: mismatched tag at line 2 column 6"),
])
def test_preprocess_refuses_malformed_structured_input(name, data, message):
    with pytest.raises(PreprocessError, match=message):
        preprocess(name, data)


def test_preprocess_csv_keeps_text_columns_as_lines():
    data = (b'id,question,answer,score\r\n1,"What, exactly?",Yes,0.5\r\n'
            b'2,Why,"multi\nline answer",1e3\r\n\r\n')
    assert text_of("t.csv", data) == (
        "question\tanswer\nWhat, exactly?\tYes\nWhy\tmulti line answer")


def test_preprocess_xml_text_nodes():
    data = b'''<?xml version="1.0" encoding="ISO-8859-1"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <entry><title>First &amp; best</title><summary>Hello <b>big</b> world!</summary></entry>
  <entry><title>Second</title><summary><![CDATA[raw <stuff>]]></summary></entry>
</feed>'''
    assert text_of("x.xml", data) == "First & best\nHello big world!\nSecond\nraw <stuff>"


@pytest.mark.parametrize("data", [
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
    b"<r>&lol2;</r>",
    b'<!DOCTYPE r SYSTEM "file:///etc/passwd" [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>',
    b"<r><!ENTITY x 'y'></r>",
])
def test_preprocess_xml_refuses_entity_declarations(data):
    with pytest.raises(PreprocessError, match=r"XML that declares entities is refused \(<!ENTITY on line"):
        preprocess("x.xml", data)


# ---- real-world shapes (issue 11) ---------------------------------------------------------------

# The skeleton of a page Sphinx (alabaster / classic themes) writes for docs.python.org-like sites.
SPHINX_PAGE = """<!DOCTYPE html>
<html lang="en" data-content_root="../">
  <head><meta charset="utf-8" /><title>json — JSON encoder and decoder &#8212; Python 3.13 documentation</title>
    <link rel="stylesheet" href="../_static/pygments.css" /><script src="../_static/doctools.js"></script>
  </head><body>
    <div class="related" role="navigation" aria-label="Related">
      <h3>Navigation</h3>
      <ul><li class="right"><a href="../genindex.html" title="General Index" accesskey="I">index</a></li>
        <li class="nav-item nav-item-0"><a href="../index.html">Python 3.13 documentation</a> &#187;</li></ul>
    </div>
    <div class="document">
      <div class="documentwrapper"><div class="bodywrapper">
        <div class="body" role="main">
  <section id="module-json">
  <h1><code class="xref py py-mod docutils literal notranslate"><span class="pre">json</span></code> — JSON encoder and decoder<a class="headerlink" href="#module-json" title="Link to this heading">¶</a></h1>
  <p><a class="reference external" href="https://json.org">JSON (JavaScript Object Notation)</a> is a lightweight data interchange format.</p>
  <section id="basic-usage"><h2>Basic Usage<a class="headerlink" href="#basic-usage" title="Link to this heading">¶</a></h2>
  <dl class="py function"><dt class="sig sig-object py" id="json.dump"><span class="sig-name descname"><span class="pre">dump</span></span>(<em>obj</em>)<a class="headerlink" href="#json.dump" title="Link to this definition">¶</a></dt>
  <dd><p>Serialize <em>obj</em> as a JSON formatted stream.</p></dd></dl>
  </section></section>
        </div>
      </div></div>
      <div class="sphinxsidebar" role="navigation" aria-label="Main">
        <div class="sphinxsidebarwrapper"><h3><a href="../contents.html">Table of Contents</a></h3>
          <ul><li><a class="reference internal" href="#">json — JSON encoder and decoder</a></li></ul>
          <div id="searchbox" style="display: none" role="search"><h3 id="searchlabel">Quick search</h3>
            <form class="search" action="../search.html" method="get"><input type="text" name="q" /></form></div>
        </div>
      </div>
      <div class="clearer"></div>
    </div>
    <div class="footer" role="contentinfo">&#169; Copyright 2001 Python Software Foundation. Built with Sphinx.</div>
  </body></html>"""


def test_preprocess_html_sphinx_page_keeps_the_body_only():
    out = text_of("json.html", SPHINX_PAGE.encode())
    assert out == ("json — JSON encoder and decoder\n\n"
                   "JSON (JavaScript Object Notation) is a lightweight data interchange format.\n\n"
                   "Basic Usage\n\ndump(obj)\n\nSerialize obj as a JSON formatted stream.")
    for furniture in ("Navigation", "Quick search", "Copyright", "Table of Contents", "¶", "index"):
        assert furniture not in out


def test_preprocess_html_without_a_main_region_drops_nav_header_footer_aside():
    page = b"""<html><body><header><a href="/">Home</a> | <a href="/blog">Blog</a></header>
<nav><ul><li>Archive</li></ul></nav><div id="sidebar">Tags: x y</div>
<h1>A post</h1><p>The words of the post.</p><aside>Related posts</aside>
<div class="cookie-banner">We use cookies</div><footer>(c) 2026 me</footer></body></html>"""
    assert text_of("p.html", page) == "A post\n\nThe words of the post."
    # a page whose <article> holds nothing does not lose its text
    assert text_of("q.html", b"<body><article></article><p>still here</p></body>") == "still here"


def test_preprocess_drops_lines_repeated_across_a_sites_pages():
    from cllmd.preprocess import RepeatedLines
    repeats = RepeatedLines(min_pages=3)
    footer = "Previous topic\nNext topic\nThis page is licensed under CC-BY-SA."
    outs = []
    for i in range(6):
        data = (f"#cllm-source https://docs.example.org/p{i}.html 2026-01-01T00:00:00Z\n"
                f"Page {i} has its own words, number {i}.\n{footer}\n").encode()
        outs.append(preprocess(f"p{i}.txt", data, repeats=repeats).text)
    assert "licensed" in outs[2] and "licensed" not in outs[3] and "licensed" not in outs[5]
    assert outs[5] == "Page 5 has its own words, number 5."
    # another site, and files with no web source, are not affected
    other = b"#cllm-source https://other.example/x 2026-01-01T00:00:00Z\nPrevious topic\n"
    assert preprocess("o.txt", other, repeats=repeats).text == "Previous topic"
    assert preprocess("n.txt", b"Previous topic\n", repeats=repeats).text == "Previous topic\n"


# The head of Debian's /etc/fonts/fonts.conf: a DOCTYPE naming an external DTD, no entities.
FONTS_CONF = b"""<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "urn:fontconfig:fonts.dtd">
<!-- /etc/fonts/fonts.conf file to configure system font access -->
<fontconfig>
\t<description>Default configuration file</description>
\t<dir>/usr/share/fonts</dir>
</fontconfig>
"""


def test_preprocess_xml_with_a_doctype_and_no_entities_is_read():
    assert text_of("fonts.conf.xml", FONTS_CONF) == "Default configuration file\n/usr/share/fonts"
    # and by content, under a name with no known extension
    pre = preprocess("fonts.conf", FONTS_CONF)
    assert pre.format == "xml" and pre.text.startswith("Default configuration")


def test_preprocess_xml_honours_its_declared_encoding():
    data = '<?xml version="1.0" encoding="ISO-8859-1"?>\n<r>café crème</r>'.encode("latin-1")
    assert text_of("x.xml", data) == "café crème"
    html = '<html><head><meta charset="windows-1252"></head><body><p>“quoted”</p></body></html>'
    assert text_of("p.html", html.encode("cp1252")) == "“quoted”"
    with pytest.raises(PreprocessError, match="declares encoding 'klingon'"):
        preprocess("x.xml", b'<?xml version="1.0" encoding="klingon"?><r/>')


# A JSON Schema (draft-07), as found under /usr/share: no text field, a few descriptions.
JSON_SCHEMA = b"""{
  "$schema": "http://json-schema.org/draft-07/schema#",
  "$id": "https://example.com/product.schema.json",
  "title": "Product",
  "description": "A product from the catalog of an online shop.",
  "type": "object",
  "properties": {
    "productId": {"description": "The unique identifier for a product", "type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "uniqueItems": true}
  },
  "required": ["productId"]
}"""


def test_preprocess_json_schema_gives_its_sentences_not_its_keywords():
    out = text_of("product.schema.json", JSON_SCHEMA)
    assert out == "A product from the catalog of an online shop.\nThe unique identifier for a product"
    with pytest.raises(PreprocessError, match="no text/content/body field and no string of two"):
        preprocess("t.json", b'{"type": "object", "required": ["a"], "$ref": "#/defs/x"}')


def test_preprocess_gzip_is_decompressed_within_the_cap():
    import gzip
    assert text_of("notes.txt.gz", gzip.compress(b"some notes\n")) == "some notes\n"
    pre = preprocess("page.html.gz", gzip.compress(b"<p>a page</p>"))
    assert (pre.format, pre.text) == ("html", "a page")
    with pytest.raises(PreprocessError, match="larger than 1000 bytes once decompressed"):
        preprocess("bomb.txt.gz", gzip.compress(b"a" * 100_000), max_bytes=1000)
    packed = gzip.compress(b"hello world, " * 100)
    with pytest.raises(PreprocessError, match="gzip-compressed data is truncated"):
        preprocess("cut.gz", packed[:30])
    with pytest.raises(PreprocessError, match="gzip-compressed data is corrupt"):
        preprocess("bad.gz", packed[:12] + b"\xff" * 20 + packed[32:])


@pytest.mark.parametrize("name, data, reason", [
    ("icon.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><path d="M10 10 L20 20"/></svg>', "an SVG image"),
    ("drawing", b'<?xml version="1.0"?>\n<svg width="10"><path d="M1 2"/></svg>', "an SVG image"),
    ("ls.1", b'.\\" Man page\n.TH LS 1\n.SH NAME\nls \\- list\n.SH SYNOPSIS\n.B ls\n', "roff source"),
    ("points.dat", (b"12.5 13.25 -7.0 8e3\n" * 40), "only 6% of its characters are letters"),
    ("blob.b64", b"QUJD" * 600, "a run of 2400 characters without a blank"),
    ("doc.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "binary data: a PDF document"),
    ("a.zip", b"PK\x03\x04\x14\x00", "binary data: a ZIP archive"),
])
def test_preprocess_refuses_what_is_not_prose_with_the_reason(name, data, reason):
    with pytest.raises(PreprocessError, match=re.escape(reason)):
        preprocess(name, data)


def test_preprocess_tsv_keeps_the_text_columns():
    data = b"id\tword\tgloss\n1\tchat\ta cat, in French\n2\tchien\ta dog\n"
    assert text_of("d.tsv", data) == "word\tgloss\nchat\ta cat, in French\nchien\ta dog"


def test_preprocess_sniffs_markup_and_json_under_unknown_names():
    assert preprocess("page", b"<!DOCTYPE html><p>hello there</p>").format == "html"
    assert preprocess("data", b'[{"text": "a record"}]').text == "a record"


# ------------------------------------------------------------------------------ streamed files


@pytest.fixture
def small_pieces(monkeypatch):
    # The streaming limits scaled down, so that small files cross every boundary.
    import cllmd.preprocess as P
    monkeypatch.setattr(P, "STREAM_MIN_BYTES", 1000)
    monkeypatch.setattr(P, "READ_BYTES", 777)
    monkeypatch.setattr(P, "PIECE_CHARS", 300)
    monkeypatch.setattr(P, "WHOLE_DOCUMENT_MAX_BYTES", 5000)
    return P


def _both(name, data):
    """(text, source, time, format, sha256, size, chars) of the whole path and the streamed one,
    or the error each gives."""
    out = []
    for run in (lambda: preprocess(name, data), lambda: preprocess_file(name, io.BytesIO(data))):
        try:
            pre = run()
            pieces = list(pre.pieces())
            assert all(len(p) <= 300 for p in pieces)
            out.append(("".join(pieces), pre.source, pre.source_time, pre.format, pre.sha256,
                        pre.size, pre.chars))
        except PreprocessError as e:
            out.append(("error", str(e)))
    return out


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.sampled_from(["héllo", "wörld", "the", "日本語", "a\r\n", "b\r", "c\n", "  "]),
                      max_size=900),
       provenance=st.booleans(), encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16"]),
       damage=st.one_of(st.none(), st.tuples(st.floats(0, 1), st.sampled_from([0, 0xFF, 0xC3]))),
       gz=st.booleans())
def test_preprocess_file_streams_text_exactly_as_whole(small_pieces, words, provenance, encoding,
                                                       damage, gz):
    # Same text, hash and errors (decoding at any offset, NULs, CR LF split across reads, the
    # provenance line, the prose check) as the whole path, in pieces of at most PIECE_CHARS.
    text = " ".join(words)
    if provenance:
        text = "#cllm-source https://example.org/a 2026-01-01T00:00:00Z\n" + text
    data = text.encode(encoding)
    if damage and data:
        at = int(damage[0] * (len(data) - 1))
        data = data[:at] + bytes([damage[1]]) + data[at + 1:]
    name = "a.txt"
    if gz:
        data, name = gzip.compress(data), "a.txt.gz"
    whole, streamed = _both(name, data)
    assert streamed == whole


def test_preprocess_file_reads_a_large_text_twice_in_pieces(small_pieces):
    text = "".join(f"line {i} of plain prose, in words.\n" for i in range(2000))
    f = io.BytesIO(text.encode())
    seen = []
    pre = preprocess_file("big.txt", f, on_piece=seen.append)
    assert pre.streamed and pre.chars == len(text) and seen[-1] == len(text) and len(seen) > 100
    assert pre.sha256 == hashlib.sha256(text.encode()).hexdigest() and pre.size == len(text)
    assert "".join(pre.pieces()) == text and pre.head(12) == "line 0 of pl"
    # written to after the first pass: the second one says so rather than store other text
    f.seek(0)
    f.write(b"LINE")
    with pytest.raises(RuntimeError, match="changed while it was being read"):
        list(pre.pieces())


@pytest.mark.parametrize("name", ["big.html", "big.xml", "big.json", "big.jsonl", "big.csv", "big.tsv"])
def test_preprocess_file_holds_whole_document_formats_to_their_cap(small_pieces, name):
    body = {"html": "<p>some words here</p>\n", "xml": "<a>some words here</a>\n",
            "json": '"some words here",\n', "jsonl": '{"text": "some words here"}\n',
            "csv": "1,some words here\n", "tsv": "1\tsome words here\n"}[name.split(".")[1]]
    ok = (body * 150).encode()   # 3-4 KB: under the (scaled) cap of 5000 bytes
    big = (body * 300).encode()
    if name.endswith(".json"):
        ok, big = b"[" + ok.rstrip(b",\n") + b"]", b"[" + big.rstrip(b",\n") + b"]"
    if name.endswith(".xml"):
        ok, big = b"<r>" + ok + b"</r>", b"<r>" + big + b"</r>"
    assert "some words here" in preprocess_file(name, io.BytesIO(ok)).text
    for run in (lambda: preprocess_file(name, io.BytesIO(big)), lambda: preprocess(name, big)):
        with pytest.raises(PreprocessError, match=r"too large for .*: \d+ bytes .*parsed whole"):
            run()


def _page(i, site="docs.example.org"):
    return (f"#cllm-source https://{site}/p{i}.html 2026-01-01T00:00:00Z\n"
            f"Page {i} has its own words, number {i}.\nPrevious topic\nNext topic\n").encode()


def test_preprocess_repeated_lines_memory_survives_in_its_file(tmp_path, caplog):
    from cllmd.preprocess import RepeatedLines
    path = tmp_path / "furniture.msgpack"
    first = RepeatedLines(min_pages=3, path=path, save_seconds=3600)
    for i in range(3):
        preprocess(f"p{i}.txt", _page(i), repeats=first)
    assert first.save() is False          # throttled: written at most every save_seconds
    assert first.save(force=True) is True and first.save(force=True) is False   # nothing new
    again = RepeatedLines(min_pages=3, path=path)
    assert preprocess("p3.txt", _page(3), repeats=again).text == "Page 3 has its own words, number 3."
    # a damaged file is set aside (kept for a look) and the memory starts afresh
    blob = path.read_bytes()
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    fresh = RepeatedLines(min_pages=3, path=path)
    assert "checksum" in caplog.text and (tmp_path / "furniture.msgpack.bad").exists()
    assert "Previous topic" in preprocess("p4.txt", _page(4), repeats=fresh).text


def test_preprocess_repeated_lines_memory_is_bounded(tmp_path):
    # max_lines per site however often lines repeat (the rarest go), max_sites sites.
    from cllmd.preprocess import RepeatedLines
    r = RepeatedLines(min_pages=2, max_lines=50, max_sites=3, path=tmp_path / "f")
    r.filter("https://old.org/x", "a line")
    for i in range(6):
        for site in ("b.org", "c.org", "d.org"):
            lines = "\n".join(f"line {k} of page {i // 2}" for k in range(40))
            r.filter(f"https://{site}/{i}", lines + "\nfooter")
    assert list(r._sites) == ["b.org", "c.org", "d.org"]
    assert all(len(c) <= 50 for c in r._sites.values())
    assert all(max(c.values()) == 6 for c in r._sites.values())   # the footer is kept
    r.save(force=True)
    assert len((tmp_path / "f").read_bytes()) <= 3 * 50 * 12 + 200
    assert RepeatedLines(max_lines=50, path=tmp_path / "f")._sites == r._sites
