"""Tests for the default corpus built from the installed standard library's documentation."""

import inspect
import json
import os
import shutil
import sys
import textwrap

import pytest

from cllmd import corpus
from cllmd.corpus import build_default_corpus, default_cache_dir, ensure_default_corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full build from the real standard library (about 3 s), shared by this module."""
    directory = tmp_path_factory.mktemp("corpus")
    return directory, build_default_corpus(directory)


@pytest.fixture(scope="module")
def text(built):
    _, files = built
    return "\n".join(p.read_text(encoding="utf-8") for p in files)


@pytest.fixture
def fake_stdlib(tmp_path):
    """A small but real standard-library-shaped tree of sources."""
    root = tmp_path / "lib"
    files = {
        "alpha.py": '''
            """Alpha module docstring."""

            # This comment explains in plain words why the module does what it does.
            # It spans two lines.
            def first():
                """First function."""

            class Thing:
                """A thing."""

                async def run(self):
                    """Run the thing."""

                def _helper(self):
                    def local():
                        """Local functions are not part of the documentation."""
            ''',
        "pkg/__init__.py": '"""The package."""\n',
        "pkg/sub.py": '"""A submodule."""\n\nTEXT = """\n# not a comment, inside a string\n"""\n',
        "pkg/tests/test_sub.py": '"""Tests are skipped."""\n',
        "test/test_alpha.py": '"""The test package is skipped."""\n',
        "site-packages/thirdparty.py": '"""Third-party code is skipped."""\n',
        "_pyalpha.py": '"""A private pure-Python duplicate, skipped."""\n',
        "pydoc_data/__init__.py": "",
        "pydoc_data/topics.py": "topics = {'zeta': 'Zeta topic text.\\n', 'alpha': 'Alpha topic.'}\n",
    }
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content).lstrip("\n"))
    return root


def _snapshot(directory):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_corpus_build_is_deterministic(built, tmp_path):
    first_dir, first = built
    second = build_default_corpus(tmp_path)
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert (first_dir / "manifest.json").read_bytes() == (tmp_path / "manifest.json").read_bytes()


def test_corpus_size_and_files_within_bounds(built):
    _, files = built
    sizes = {p.name: p.stat().st_size for p in files}
    assert 2_500_000 <= sum(sizes.values()) <= 6_000_000, sizes
    assert all(size <= 600_000 for size in sizes.values()), sizes
    assert [p.name for p in files] == sorted(sizes)
    assert len(files) >= 5


def test_corpus_is_valid_utf8_text(built):
    _, files = built
    for path in files:
        data = path.read_bytes()
        decoded = data.decode("utf-8")  # raises if not UTF-8
        assert "\r" not in decoded and "\0" not in decoded, path.name
        assert data.endswith(b"\n"), path.name


def test_corpus_contains_known_docstrings(text):
    import json as json_module  # side-effect free, to compare with the real docstrings

    assert "module json.decoder\n\nImplementation of JSONDecoder" in text
    assert inspect.getdoc(json_module) in text
    decode_doc = inspect.getdoc(json_module.JSONDecoder.decode)
    assert f"method json.decoder.JSONDecoder.decode\n\n{decode_doc}" in text
    assert f"function json.loads\n\n{inspect.getdoc(json_module.loads)}" in text
    # pydoc's topic help, the language reference sections
    assert "topic if\n\n" in text


def test_corpus_skips_tests_third_party_and_private_duplicates(text):
    for heading in ("module test.", "module idlelib.idle_test", "module unittest.test",
                    "module _pydecimal", "module _pyio", "module numpy", "module pytest"):
        assert heading not in text, heading
    assert "module io\n" in text and "module json\n" in text


def test_corpus_extraction_on_a_small_tree(fake_stdlib, tmp_path):
    files = build_default_corpus(tmp_path / "out", stdlib=fake_stdlib)
    assert [p.name for p in files] == ["pydoc-topics-00.txt", "stdlib-00-alpha.txt"]
    assert files[0].read_text() == "topic alpha\n\nAlpha topic.\n\ntopic zeta\n\nZeta topic text.\n"
    assert files[1].read_text() == textwrap.dedent('''\
        module alpha

        Alpha module docstring.

        # This comment explains in plain words why the module does what it does.
        # It spans two lines.

        function alpha.first

        First function.

        class alpha.Thing

        A thing.

        async method alpha.Thing.run

        Run the thing.

        module pkg

        The package.

        module pkg.sub

        A submodule.
        ''')


def test_corpus_build_removes_stale_files_only(fake_stdlib, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stdlib-07-old.txt").write_text("from an older build")
    (out / "notes.txt").write_text("not ours")
    build_default_corpus(out, stdlib=fake_stdlib)
    assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt", "pydoc-topics-00.txt",
                                       "stdlib-00-alpha.txt"]


def test_corpus_build_refuses_empty_stdlib(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Python standard library sources found"):
        build_default_corpus(tmp_path / "out", stdlib=tmp_path / "empty")


def test_ensure_default_corpus_builds_once_then_reuses(fake_stdlib, tmp_path):
    cache = tmp_path / "cache"
    files = ensure_default_corpus(cache, stdlib=fake_stdlib)
    directory = cache / f"corpus-py{sys.version_info.major}.{sys.version_info.minor}"
    assert [p.parent for p in files] == [directory] * len(files)
    before = _snapshot(directory)
    again = ensure_default_corpus(cache, stdlib=fake_stdlib)
    assert again == files
    assert _snapshot(directory) == before  # nothing was rewritten


def test_ensure_default_corpus_rebuilds_damaged_or_outdated(fake_stdlib, tmp_path):
    cache = tmp_path / "cache"
    files = ensure_default_corpus(cache, stdlib=fake_stdlib)
    good = files[1].read_bytes()
    files[1].write_bytes(good[:-5] + b"XXXXX")  # same size, different content
    assert ensure_default_corpus(cache, stdlib=fake_stdlib) == files
    assert files[1].read_bytes() == good

    manifest_path = files[0].parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["builder"] = corpus.BUILDER_VERSION - 1
    manifest_path.write_text(json.dumps(manifest))
    before = _snapshot(files[0].parent)
    ensure_default_corpus(cache, stdlib=fake_stdlib)
    assert _snapshot(files[0].parent) != before
    assert json.loads(manifest_path.read_text())["builder"] == corpus.BUILDER_VERSION

    files[0].unlink()
    assert ensure_default_corpus(cache, stdlib=fake_stdlib) == files
    assert files[0].is_file()


def test_ensure_default_corpus_reuses_a_real_build(built, tmp_path):
    # The default standard library: a complete build already in the cache is used as is.
    source_dir, files = built
    directory = tmp_path / f"corpus-py{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copytree(source_dir, directory)
    before = _snapshot(directory)
    reused = ensure_default_corpus(tmp_path)
    assert [p.name for p in reused] == [p.name for p in files]
    assert _snapshot(directory) == before


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path}/sd:{tmp_path}/other")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "sd"
    monkeypatch.delenv("CACHE_DIRECTORY")
    assert default_cache_dir() == tmp_path / "xdg" / "cllmd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cllmd"
