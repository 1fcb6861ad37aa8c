"""What cllm-http adds over the ZeroMQ client: time to first token and tokens/s of streamed
generations, 1 stream and 16 concurrent streams, straight to the daemon (cllm.client) and through
the gateway (/v1/completions, SSE), in alternating rounds on the same daemon.

    .venv/bin/python benchmarks/bench_http.py                       # 64 tokens, 5 rounds
    .venv/bin/python benchmarks/bench_http.py --tokens 128 --rounds 7 --model default

--model tiny is the test suite's 1-layer model (about 0.3 ms a token: the gateway's own cost
shows most); --model default is the daemon's default shape (1.3M parameters). Both clients read
every piece as it arrives; tokens/s is the tokens generated (the done event's count, the usage
chunk's) over the time from sending the request to the last piece, per stream, end to end.
Prints medians over rounds of the per-stream medians, and the ratios gateway / ZeroMQ.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cllm.client import Client  # noqa: E402
from tests.daemonproc import Daemon  # noqa: E402
from tests.gatewayproc import Gateway  # noqa: E402

PROMPT = "The spheres turn around node zero"
DEFAULT_MODEL = ["--model-n-layer", "4", "--model-n-head", "4", "--model-n-embd", "128",
                 "--model-block-size", "256"]


def via_zmq(sock: str, tokens: int) -> tuple[float, float]:
    with Client(sock, timeout=120) as c:
        t0 = time.perf_counter()
        gen = c.generate(PROMPT, max_tokens=tokens, temperature=0)
        times = [time.perf_counter() for _ in gen]
    return times[0] - t0, gen.stats["tokens_generated"] / (times[-1] - t0)


def via_http(port: int, model: str, tokens: int) -> tuple[float, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()   # bytes above: headers and body go in one send
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    times, generated = [], None
    for line in resp:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    conn.close()
    return times[0] - t0, generated / (times[-1] - t0)


def round_of(fn, streams: int) -> tuple[float, float]:
    """(median time to first token, median tokens/s) of `streams` concurrent generations."""
    results: list = [None] * streams
    def run(i):
        results[i] = fn()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", choices=("tiny", "default"), default="tiny")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-http-"))
    extra = [] if args.model == "tiny" else DEFAULT_MODEL
    d = Daemon(root, *extra, "--server-generate-workers", str(max(args.streams)),
               "--server-max-pending-generations", str(2 * max(args.streams)),
               "--no-train-auto-train", model=args.model == "tiny").start()
    g = Gateway(d.run / "cllmd.sock", root / "gw.log").start()
    try:
        model = g.json("GET", "/v1/models")[1]["data"][0]["id"]
        sock = str(d.run / "cllmd.sock")
        zmq_fn = lambda: via_zmq(sock, args.tokens)                # noqa: E731
        http_fn = lambda: via_http(g.port, model, args.tokens)      # noqa: E731
        round_of(zmq_fn, 2), round_of(http_fn, 2)                   # warm up both paths
        print(f"model {args.model}, {args.tokens} tokens a stream, greedy, {args.rounds} rounds "
              f"(medians)")
        print(f"{'streams':>7}  {'path':<9} {'TTFT ms':>8} {'tok/s':>8}")
        for n in args.streams:
            rows = {"zeromq": [], "gateway": []}
            for _ in range(args.rounds):   # alternating, so the machine's noise hits both alike
                rows["zeromq"].append(round_of(zmq_fn, n))
                rows["gateway"].append(round_of(http_fn, n))
            med = {k: (statistics.median(r[0] for r in v) * 1e3, statistics.median(r[1] for r in v))
                   for k, v in rows.items()}
            for k, (ttft, tps) in med.items():
                print(f"{n:>7}  {k:<9} {ttft:>8.2f} {tps:>8.0f}")
            z, h = med["zeromq"], med["gateway"]
            print(f"{n:>7}  {'gateway/zeromq':<9} TTFT +{h[0] - z[0]:.2f} ms ({h[0] / z[0]:.2f}x), "
                  f"tok/s {h[1] / z[1]:.2f}x")
    finally:
        g.stop()
        d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
