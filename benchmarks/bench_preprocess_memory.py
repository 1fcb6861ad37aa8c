"""Peak memory of preprocessing one large file, per format (issue 11, F3).

    .venv/bin/python benchmarks/bench_preprocess_memory.py [--mib 32 64]

For each format a file of --mib MiB of generated prose is written, then read and preprocessed
in a fresh process the way the queue does (preprocess_file on the open file, and for plain text
its pieces read again as the tokenizer would); the figure is that process's peak RSS (VmHWM)
beyond its RSS before opening the file. Plain text streams; the other formats are parsed whole,
which is why they are held to cllm.layout.WHOLE_DOCUMENT_MAX_BYTES (32 MiB).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch".split()

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[3])
import cllmd.preprocess as P
P.WHOLE_DOCUMENT_MAX_BYTES = 1 << 40   # measure past the cap
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
with open(sys.argv[1], "rb") as f:
    pre = P.preprocess_file(sys.argv[2], f, max_bytes=1 << 40)
    chars = sum(len(p) for p in pre.pieces())
# VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across fork and exec
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(peak - base, chars, pre.streamed)
"""


def make(fmt: str, size: int, rng: random.Random) -> bytes:
    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(12)) + "."
    parts, n = [], 0
    while n < size:
        p = {"html": lambda: f"<div class='x'><p>{sentence()} <b>{sentence()}</b></p></div>\n",
             "json": lambda: json.dumps({"text": sentence(), "id": n, "tags": ["a b", "c"]}) + ",\n",
             "jsonl": lambda: json.dumps({"text": sentence(), "id": n}) + "\n",
             "xml": lambda: f"<item><title>{sentence()}</title><body>{sentence()}</body></item>\n",
             "csv": lambda: f'{n},"{sentence()}",3.5\n',
             "txt": lambda: sentence() + "\n"}[fmt]()
        parts.append(p)
        n += len(p)
    body = "".join(parts)
    if fmt == "html":
        body = "<html><body>" + body + "</body></html>"
    elif fmt == "json":
        body = "[" + body.rstrip(",\n") + "]"
    elif fmt == "xml":
        body = "<root>" + body + "</root>"
    return body.encode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, nargs="+", default=[32, 64])
    a = p.parse_args()
    rng = random.Random(0)
    print(f"{'format':<7}" + "".join(f"{m:>6} MiB: peak RSS beyond start" for m in a.mib))
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("txt", "html", "json", "jsonl", "xml", "csv"):
            cells = []
            for mib in a.mib:
                path = Path(tmp) / f"big.{fmt}"
                path.write_bytes(make(fmt, mib * 2**20, rng))
                out = subprocess.run([sys.executable, "-c", CHILD, str(path), path.name, str(HERE.parent)],
                                     capture_output=True, text=True, check=True).stdout.split()
                grown = int(out[0])
                cells.append(f"{grown / 2**20:>10.0f} MiB = {grown / path.stat().st_size:4.1f}x file"
                             + (" (streamed)" if out[2] == "True" else "           "))
            print(f"{fmt:<7}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
