"""Preprocessing of queued files by format, encoding and provenance line."""

import codecs

import pytest

from cllmd.preprocess import PreprocessError, Preprocessed, format_of, preprocess


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
    assert pre == Preprocessed(text="  indented\nline two\nthree\n\n\nend  ", source="a.txt",
                               format="text")


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
    assert text_of("d.json", data) == "first doc\nno text field\na\nb\ndeep\nbare string"
    assert text_of("d.json", b'{"body": "b", "title": "t"}', json_fields=("title",)) == "t"
    assert text_of("d.json", b'{"text": null, "content": " ", "title": "t"}') == "t"


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
    b'<!DOCTYPE r SYSTEM "file:///etc/passwd"><r/>',
    b"<r><!ENTITY x 'y'></r>",
])
def test_preprocess_xml_refuses_dtd_and_entities(data):
    with pytest.raises(PreprocessError, match=r"XML with a DTD is refused \(<!(DOCTYPE|ENTITY) on line"):
        preprocess("x.xml", data)
