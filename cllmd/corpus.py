"""The embedded default corpus: documentation text of the installed Python standard library.

Built at run time from module, class and function docstrings, prose comment blocks (read from
the source with `ast`, nothing is imported) and pydoc's topic help, deterministically.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from cllm import layout
from cllm.durable import atomic_write

log = logging.getLogger(__name__)

# Bump when the output for a given standard library changes, so caches are rebuilt.
BUILDER_VERSION = 1
MANIFEST = "manifest.json"
# A file is closed at the first top-level module boundary past this size (~0.4-0.5 MB files).
TARGET_FILE_BYTES = 384 * 1024

# Directories that hold tests, third-party code or build artefacts rather than documentation.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "lib-dynload", "pydoc_data"}
# Top-level modules that are private pure-Python duplicates of C modules (_pydecimal, _pyio,
# _py_abc), frozen test modules, or generated build data.
_SKIP_TOPLEVEL = re.compile(r"^(_py.*|__phello__|__hello__|_sysconfigdata_.*)$")
_OUTPUT_FILES = re.compile(r"^(stdlib|pydoc-topics)-\d+.*\.txt$")

_MIN_COMMENT_WORDS = 8
_MIN_COMMENT_LINES = 1
_MIN_COMMENT_PROSE = 0.8  # fraction of letters and spaces: prose, not commented-out code


def stdlib_dir() -> Path:
    """The directory of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _python_id() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def _source_files(root: Path) -> list[tuple[str, Path]]:
    """(module name, path) of every documentation-bearing .py file, sorted by module name
    (a package right before its submodules)."""
    return sorted(_walk_sources(root), key=lambda item: item[0].split("."))


def _walk_sources(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in _SKIP_DIRS and not d.startswith("config-")
            and not (rel == Path(".") and _SKIP_TOPLEVEL.match(d))
            # only packages: a directory without __init__.py is data (e.g. ensurepip/_bundled)
            and (Path(dirpath, d, "__init__.py").is_file())
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            if rel == Path(".") and _SKIP_TOPLEVEL.match(stem):
                continue
            parts = [*rel.parts] if stem == "__init__" else [*rel.parts, stem]
            if not parts or not all(p.isidentifier() for p in parts):
                continue
            yield ".".join(parts), Path(dirpath, name)


def _clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


def _docstring_entries(tree: ast.Module, modname: str) -> list[tuple[int, str]]:
    """(line, text) for the docstrings of the module and its classes, functions, methods."""
    entries = []
    doc = ast.get_docstring(tree)
    if doc:
        entries.append((0, _clean(doc)))

    def visit(body: list[ast.stmt], prefix: str, in_class: bool) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                label = "class"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                label = "method" if in_class else "function"
                if isinstance(node, ast.AsyncFunctionDef):
                    label = "async " + label
            else:
                continue
            qualname = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                entries.append((node.lineno, f"{label} {qualname}\n\n{_clean(doc)}"))
            if isinstance(node, ast.ClassDef):  # methods and nested classes, not local defs
                visit(node.body, qualname, True)

    visit(tree.body, modname, False)
    return entries


def _string_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside multi-line string literals, where a '#' line is not a comment."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            if node.end_lineno is not None and node.end_lineno > node.lineno:
                inside.update(range(node.lineno + 1, node.end_lineno + 1))
    return inside


def _comment_entries(source: str, in_strings: set[int]) -> list[tuple[int, str]]:
    """(line, text) of blocks of two or more full-line comments that read as prose."""
    entries = []
    block: list[str] = []
    start = 0

    def flush() -> None:
        if len(block) < _MIN_COMMENT_LINES:
            return
        body = " ".join(line.lstrip("#").strip() for line in block)
        words = body.split()
        if len(words) < _MIN_COMMENT_WORDS:
            return
        prose = sum(c.isalpha() or c == " " for c in body) / len(body)
        if prose >= _MIN_COMMENT_PROSE:
            entries.append((start, "\n".join(block)))

    for lineno, line in enumerate(source.split("\n"), start=1):
        stripped = line.strip()
        if stripped.startswith("#") and lineno not in in_strings \
                and not stripped.startswith("#!") and "-*-" not in stripped:
            if not block:
                start = lineno
            block.append(stripped)
        else:
            flush()
            block = []
    flush()
    return entries


def _module_document(path: Path, modname: str, seen: set[bytes]) -> str | None:
    """The document of one module: a heading line, then its docstrings and prose comments in
    source order, each separated by a blank line. Texts already seen elsewhere are left out."""
    try:
        source = importlib.util.decode_source(path.read_bytes())
        tree = ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as e:
        log.debug("skipping %s: %s", path, e)
        return None
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    entries = _docstring_entries(tree, modname)
    entries += _comment_entries(source, _string_lines(tree))
    entries.sort(key=lambda e: e[0])  # stable: a docstring precedes a comment on its line
    parts = [f"module {modname}"]
    for _, text in entries:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if not text or digest in seen:
            continue
        seen.add(digest)
        parts.append(text)
    return "\n\n".join(parts) + "\n" if len(parts) > 1 else None


def _topic_documents(root: Path) -> list[str]:
    """pydoc's help topics (the language reference sections), read from pydoc_data/topics.py."""
    path = root / "pydoc_data" / "topics.py"
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as e:
        log.debug("no pydoc topics: %s", e)
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            try:
                topics = ast.literal_eval(node.value)
            except ValueError:
                return []
            return [f"topic {name}\n\n{_clean(text)}\n" for name, text in sorted(topics.items())
                    if isinstance(name, str) and isinstance(text, str) and text.strip()]
    return []


# --------------------------------------------------------------------------------------------
# Building and caching
# --------------------------------------------------------------------------------------------


def _group(documents: list[tuple[str, str]], prefix: str) -> list[tuple[str, str]]:
    """Pack (group key, document) pairs into files of about TARGET_FILE_BYTES, closing a file
    only where the group key changes. Returns (file name, content)."""
    files: list[tuple[str, str]] = []
    current: list[str] = []
    size = 0
    first_key = last_key = ""
    for key, doc in documents:
        if current and key != last_key and size >= TARGET_FILE_BYTES:
            files.append((f"{prefix}-{len(files):02d}-{first_key}.txt", "\n".join(current)))
            current, size = [], 0
        if not current:
            first_key = key
        current.append(doc)
        size += len(doc.encode("utf-8")) + 1
        last_key = key
    if current:
        files.append((f"{prefix}-{len(files):02d}-{first_key}.txt", "\n".join(current)))
    return files


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_default_corpus(directory: os.PathLike | str, *,
                         stdlib: os.PathLike | str | None = None) -> list[Path]:
    """Write the default corpus into `directory` and return its text files, sorted by name.

    Each file is written atomically, then `manifest.json` (sha256 and size of every file) is
    written last; corpus files from an earlier build that are no longer produced are removed.
    `stdlib` is the standard library directory to read (default: this interpreter's).
    """
    t0 = time.monotonic()
    root = Path(stdlib) if stdlib is not None else stdlib_dir()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (directory / MANIFEST).unlink()  # incomplete until the new manifest is written

    seen: set[bytes] = set()
    module_docs = []
    for modname, path in _source_files(root):
        doc = _module_document(path, modname, seen)
        if doc is not None:
            module_docs.append((modname.split(".")[0], doc))
    if not module_docs:
        raise FileNotFoundError(f"{root}: no Python standard library sources found; cannot "
                                f"build the default corpus")
    topics = [(str(i), doc) for i, doc in enumerate(_topic_documents(root))]
    contents = _group(module_docs, "stdlib") + _group(topics, "pydoc-topics")
    # Topic groups are keyed by index; name those files by number only.
    contents = [(re.sub(r"^(pydoc-topics-\d+)-\d+\.txt$", r"\1.txt", name), text)
                for name, text in contents]
    contents.sort()

    written = []
    entries = []
    for name, text in contents:
        data = text.encode("utf-8")
        atomic_write(directory / name, data)
        written.append(directory / name)
        entries.append({"name": name, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    names = {name for name, _ in contents}
    for stale in directory.iterdir():
        if _OUTPUT_FILES.match(stale.name) and stale.name not in names:
            stale.unlink()
    manifest = {"builder": BUILDER_VERSION, "python": _python_id(), "stdlib": str(root),
                "files": entries}
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
    log.info("built the default corpus in %s: %d files, %d bytes, %.1f s", directory,
             len(written), sum(e["bytes"] for e in entries), time.monotonic() - t0)
    return written


def default_cache_dir() -> Path:
    """$CACHE_DIRECTORY (systemd), else $XDG_CACHE_HOME/cllmd (cllm.layout.cache_dir)."""
    return layout.cache_dir()


def _complete_corpus(directory: Path, root: Path) -> list[Path] | None:
    """The files of a finished build of the same builder from the same stdlib, or None."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        if (manifest["builder"], manifest["python"], manifest["stdlib"]) != (
                BUILDER_VERSION, _python_id(), str(root)):
            return None
        files = []
        for entry in manifest["files"]:
            path = directory / entry["name"]
            if path.stat().st_size != entry["bytes"] or _sha256_file(path) != entry["sha256"]:
                log.warning("default corpus file %s is damaged; rebuilding", path)
                return None
            files.append(path)
        return files or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_default_corpus(cache_dir: os.PathLike | str | None = None, *,
                          stdlib: os.PathLike | str | None = None) -> list[Path]:
    """The default corpus files, built once into <cache>/corpus-py<major>.<minor>/ and reused
    while the manifest and every file's sha256 match. Concurrent callers build it once."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = Path(stdlib) if stdlib is not None else stdlib_dir()
    tag = f"corpus-py{sys.version_info.major}.{sys.version_info.minor}"
    directory = cache / tag
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{tag}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        files = _complete_corpus(directory, root)
        if files is not None:
            return files
        log.info("building the default corpus from %s into %s", root, directory)
        return build_default_corpus(directory, stdlib=root)


__all__ = ["build_default_corpus", "default_cache_dir", "ensure_default_corpus", "stdlib_dir"]
