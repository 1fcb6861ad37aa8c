"""Daemon benchmark: ping latency idle and while training, generation while training, ingestion.

    .venv/bin/python benchmarks/bench_daemon.py [--pings 1000] [--ingest-mb 8]

Starts a real `cllmd serve` on temporary directories with the default model shape (4 layers,
128 wide, context 128; bytes tokenizer unless --bpe) and measures over its real sockets:
- ping round trips, p50 / p99, with the trainer idle and with it training on every core;
- streamed generation while training: time to the first token and tokens/s (and the same with
  training paused, side by side);
- ingestion: MB/s of text dropped into the queue until every file is in done/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.daemonproc import Daemon, drop, wait_for  # noqa: E402

SHAKESPEARE = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def percentiles(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_ms": 1e3 * s[len(s) // 2], "p99_ms": 1e3 * s[int(len(s) * 0.99) - 1], "n": len(s)}


def pings(client, n: int) -> dict:
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.request("ping")
        rtts.append(time.perf_counter() - t0)
    return percentiles(rtts)


def generations(client, n: int, tokens: int) -> dict:
    first, rates = [], []
    for i in range(n):
        t0 = time.perf_counter()
        g = client.generate("The ", max_tokens=tokens, temperature=0.8, seed=i)
        it = iter(g)
        next(it)
        first.append(time.perf_counter() - t0)
        for _ in it:
            pass
        rates.append(g.stats["tokens_per_second"])
    return {"first_token_ms_median": 1e3 * statistics.median(first),
            "tokens_per_second_median": statistics.median(rates)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pings", type=int, default=1000)
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--ingest-mb", type=float, default=8.0)
    p.add_argument("--bpe", action="store_true", help="BPE 4096 tokenizer (the daemon's default) instead of bytes")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        d = Daemon(root, "--no-train-auto-train", "--model-n-layer", "4", "--model-n-head", "4",
                   "--model-n-embd", "128", "--model-block-size", "128",
                   *(["--model-tokenizer", "bpe", "--model-vocab-size", "4096"] if args.bpe else []),
                   "--train-checkpoint-interval-seconds", "300", model=False)
        d.start()
        c = d.client
        wait_for(lambda: c.request("status")["queue"]["incoming"] == 0
                 and c.request("status")["queue"]["processing"] == 0, 300, "the default corpus to be ingested")
        results["model"] = c.request("model.info")["config"]
        results["ping_idle"] = pings(c, args.pings)
        print("ping idle:", results["ping_idle"], flush=True)

        # ingestion: distinct documents (so none is a duplicate), the bytes counted as files
        text = SHAKESPEARE.read_text() if SHAKESPEARE.exists() else "the quick brown fox\n" * 50000
        chunk = text[:256 * 1024]
        n_files = max(1, int(args.ingest_mb * 1024 * 1024 / len(chunk.encode())))
        payloads = [f"# part {i}\n{chunk}".encode() for i in range(n_files)]
        done_before = len(d.queue("done"))
        t0 = time.perf_counter()
        for i, data in enumerate(payloads):
            drop(d, f"ingest-{i:04d}.txt", data)
        wait_for(lambda: len(d.queue("done")) >= done_before + n_files, 600, "ingestion")
        seconds = time.perf_counter() - t0
        mb = sum(map(len, payloads)) / 1e6
        results["ingest"] = {"mb": round(mb, 2), "seconds": round(seconds, 2), "mb_per_second": mb / seconds}
        print("ingest:", results["ingest"], flush=True)

        c.request("train.start", steps=10**9)
        wait_for(lambda: c.request("train.status")["step"] >= 3, 120, "training to start")
        results["ping_training"] = pings(c, args.pings)
        print("ping while training:", results["ping_training"], flush=True)
        results["generate_training"] = generations(c, args.generations, args.tokens)
        print("generate while training:", results["generate_training"], flush=True)
        results["train_tokens_per_second"] = c.request("train.status")["tokens_per_second"]
        c.request("train.pause")
        wait_for(lambda: c.request("train.status")["state"] == "paused", 60, "pause")
        results["generate_paused"] = generations(c, args.generations, args.tokens)
        print("generate with training paused:", results["generate_paused"], flush=True)
        d.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
