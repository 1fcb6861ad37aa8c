"""Memory benchmark: peak RSS of training, each case measured in a fresh child process.

    .venv/bin/python benchmarks/bench_memory.py datastore                  # 1 MB vs 100 MB of tokens
    .venv/bin/python benchmarks/bench_memory.py checkpointing              # with and without, two shapes
    .venv/bin/python benchmarks/bench_memory.py gpt2 --shape gpt2-256-bytes  # GPT-2 shapes against PyTorch

datastore: builds two data stores of synthetic tokens (random ids, documents of ~40 KB, no
shipped data) holding ~1 MB and ~100 MB, then trains the daemon's default model shape on each
in a child process (same steps, evaluations included) and compares the children's peak RSS
(VmHWM): the store is memory-mapped and sampled by windows, so it should stay flat.
With --pages release the children read batches through AdvisedStore, which models a fix for
DataStore: drop the shard pages from the process after each batch (see its docstring);
--pages random only advises the maps MADV_RANDOM (which turns readahead off).
gpt2: GPT-2 family shapes (small's at block 256 with bytes, gpt2, gpt2-medium, gpt2-large),
cllmd's trainer and the same model in PyTorch eager float32, each in its own child process,
alternating: peak RSS from the first step on, and tokens/s (median step after the first).
checkpointing: trains with and without gradient checkpointing in child processes and reports
peak RSS and the threads' workspace bytes (its time cost is measured interleaved in one
process by bench_train.py --checkpointing). Children run one after the other, alternating.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "baby": dict(vocab_size=257, n_layer=4, n_head=4, n_embd=128, block_size=64),
    "default": dict(vocab_size=4096, n_layer=4, n_head=4, n_embd=128, block_size=128),
    "medium": dict(vocab_size=4096, n_layer=8, n_head=8, n_embd=256, block_size=256),
    # the GPT-2 family: small's shape at block 256 with the bytes vocabulary (issue 12's), then real ones
    "gpt2-256-bytes": dict(vocab_size=257, n_layer=12, n_head=12, n_embd=768, block_size=256),
    "gpt2": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(vocab_size=50257, n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(vocab_size=50257, n_layer=36, n_head=20, n_embd=1280, block_size=1024),
}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class AdvisedStore:
    """A DataStore whose shard maps get madvise advice: "release" drops their pages from the
    process after every batch read, "random" marks them MADV_RANDOM when first mapped.

    Reading a window from a memory map faults in its page, and the kernel maps up to 64 KiB of
    neighbouring cached pages with it ("fault-around"); those file-backed pages stay counted in
    the process's RSS until unmapped, so RSS grows with every distinct window sampled, up to the
    whole store. madvise(MADV_DONTNEED) on a shared file mapping only unmaps them (they stay
    in the page cache, nothing is written or lost). Benchmark-only: it reaches into the store's
    private map cache, as a patch to DataStore._windows would.
    """

    def __init__(self, store, mode: str):
        self.store, self.mode = store, mode
        self.advised: set[int] = set()

    def __getattr__(self, name):
        return getattr(self.store, name)

    def _release(self, result):
        import mmap
        for mm in list(self.store._maps.values()):
            if self.mode == "release":
                mm._mmap.madvise(mmap.MADV_DONTNEED)
            elif id(mm) not in self.advised:  # random: advise each new map once
                mm._mmap.madvise(mmap.MADV_RANDOM)
                self.advised.add(id(mm))
        return result

    def sample_batch(self, *args, **kwargs):
        return self._release(self.store.sample_batch(*args, **kwargs))

    def eval_windows(self, *args, **kwargs):
        return self._release(self.store.eval_windows(*args, **kwargs))


def reset_peak_rss() -> None:
    """Starts VmHWM afresh from the current RSS (Linux >= 4.0: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def gpt2_child(spec: dict) -> dict:
    """Runs in the child: spec["impl"] ("cllmd" or "torch") trains spec["steps"] steps of the
    shape at spec["batch"] on spec["threads"] threads; peak RSS counts from the first step
    (after the model and optimizer exist), time per step is the median after the first."""
    import numpy as np

    from cllmd.model import Model, ModelConfig
    from cllmd.tokensource import TokenArraySource
    from cllmd.trainer import TrainConfig, Trainer

    cfg = ModelConfig(**SHAPES[spec["shape"]])
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 2_000_000).astype(np.uint16)
    source = TokenArraySource(tokens, 0.1)
    setup_t0 = time.perf_counter()
    if spec["impl"] == "cllmd":
        trainer = Trainer(Model(cfg, seed=0), source,
                          TrainConfig(batch_size=spec["batch"], warmup=10,
                                      grad_checkpointing=spec.get("checkpointing", False)),
                          threads=spec["threads"])
        run = trainer.step
    else:
        import gc

        import torch
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_train import TorchRunner
        model = Model(cfg, seed=0)
        runner = TorchRunner(cfg, model.params, source, spec["batch"])
        del model
        gc.collect()
        torch.set_num_threads(spec["threads"])
        run = lambda: runner.round(spec["threads"], 1)  # noqa: E731
    setup_s = time.perf_counter() - setup_t0
    rss_setup = status_kib("VmRSS")
    reset_peak_rss()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    out = {"impl": spec["impl"], "peak_rss_mib": status_kib("VmHWM") / 1024, "rss_setup_mib": rss_setup / 1024,
           "s_per_step": statistics.median(times[1:] or times), "steps": len(times), "setup_s": setup_s,
           "tokens_per_step": spec["batch"] * cfg.block_size}
    if spec["impl"] == "cllmd":
        out["gradient_rows"] = trainer.gradsum.rows_allocated
        out["workspace_mib"] = trainer.workspaces.nbytes / 2**20
        trainer.close()
    out["tokens_per_second"] = out["tokens_per_step"] / out["s_per_step"]
    return out


def gpt2(args) -> None:
    """Alternating children, cllmd then PyTorch, args.repeats times; medians."""
    results: dict[str, list[dict]] = {"cllmd": [], "torch": []}
    impls = ["cllmd"] + ([] if args.no_torch else ["torch"])
    print(f"{args.shape} {SHAPES[args.shape]}, batch {args.batch}, {args.threads} threads, {args.steps} steps "
          f"per child{', checkpointing' if args.checkpointing else ''}; load average %.2f %.2f %.2f"
          % os.getloadavg(), flush=True)
    # numba's cache filled first: a child that compiled the kernels (after any change to them)
    # would count LLVM's working memory in its peak (~150 MiB measured), which no run of a
    # daemon with its cache in place pays
    run_child({"gpt2": True, "impl": "cllmd", "shape": "baby", "batch": 12, "threads": args.threads, "steps": 1,
               "checkpointing": args.checkpointing})
    for _ in range(args.repeats):
        for impl in impls:
            r = run_child({"gpt2": True, "impl": impl, "shape": args.shape, "batch": args.batch,
                           "threads": args.threads, "steps": args.steps, "checkpointing": args.checkpointing})
            results[impl].append(r)
            print(f"  {impl}: " + ", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in r.items() if k != "impl"), flush=True)
    med = {impl: {k: statistics.median(r[k] for r in runs) for k in ("peak_rss_mib", "tokens_per_second")}
           for impl, runs in results.items() if runs}
    for impl, m in med.items():
        print(f"{impl}: peak RSS {m['peak_rss_mib']:,.0f} MiB, {m['tokens_per_second']:,.1f} tokens/s")
    if "torch" in med:
        c, t = med["cllmd"], med["torch"]
        print(f"cllmd / PyTorch: tokens/s {c['tokens_per_second'] / t['tokens_per_second']:.2f}x, "
              f"peak RSS {c['peak_rss_mib'] / t['peak_rss_mib']:.2f}x")
    print("load average %.2f %.2f %.2f" % os.getloadavg())


def child(spec: dict) -> dict:
    """Runs in the child: train spec["steps"] steps, report memory and time."""
    import numpy as np

    from cllmd.datastore import DataStore
    from cllmd.model import Model, ModelConfig
    from cllmd.tokensource import TokenArraySource
    from cllmd.trainer import TrainConfig, Trainer

    cfg = ModelConfig(**SHAPES[spec["shape"]])
    if spec.get("store"):
        source = DataStore(spec["store"], vocab_size=cfg.vocab_size)
        if spec.get("pages", "keep") != "keep":
            source = AdvisedStore(source, spec["pages"])
    else:
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 2_000_000).astype(np.uint16)
        source = TokenArraySource(tokens, 0.1)
    before = status_kib("VmRSS")
    trainer = Trainer(Model(cfg, seed=0), source,
                      TrainConfig(batch_size=12, warmup=10, eval_windows=240,
                                  grad_checkpointing=spec.get("checkpointing", False)),
                      threads=spec["threads"])
    times = []
    for step in range(spec["steps"]):
        t0 = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - t0)
        if spec.get("eval_every") and (step + 1) % spec["eval_every"] == 0:
            trainer.evaluate()
    activations = trainer.workspaces.nbytes
    trainer.close()
    out = {"peak_rss_mib": status_kib("VmHWM") / 1024, "rss_before_trainer_mib": before / 1024,
           "rss_file_mib": status_kib("RssFile") / 1024, "rss_anon_mib": status_kib("RssAnon") / 1024,
           "activation_mib": activations / 2**20, "ms_per_step": 1e3 * statistics.median(times[2:] or times)}
    if spec.get("store"):
        out["store_tokens"] = int(source.num_tokens("train") + source.num_tokens("val"))
        source.close()
    return out


def run_child(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"child failed: {r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def build_store(directory: Path, megabytes: float, vocab_size: int) -> int:
    """A store of ~megabytes of uint16 tokens in documents of ~20k tokens; returns its token count."""
    import numpy as np

    from cllmd.datastore import DataStore
    rng = np.random.default_rng(int(megabytes * 1000))
    target = int(megabytes * 2**20) // 2
    written = 0
    with DataStore(directory, vocab_size=vocab_size) as store:
        i = 0
        while written < target:
            n = int(min(target - written, max(200, rng.normal(20_000, 5_000))))
            tokens = rng.integers(0, vocab_size, n).astype(np.uint16)
            store.append(tokens, source=f"synthetic-{i}", sha256=hashlib.sha256(b"doc %d" % i).hexdigest())
            written += n
            i += 1
    return written


def datastore(args) -> None:
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="cllmd-bench-memory-") as tmp:
        sizes = {"1MB": 1.0, "100MB": 100.0}
        stores = {}
        for name, mb in sizes.items():
            t0 = time.perf_counter()
            tokens = build_store(Path(tmp) / name, mb, shape["vocab_size"])
            stores[name] = str(Path(tmp) / name)
            print(f"store {name}: {tokens:,} tokens ({2 * tokens / 2**20:.1f} MiB of uint16) "
                  f"built in {time.perf_counter() - t0:.1f}s", flush=True)
        results = {name: [] for name in sizes}
        for _ in range(args.repeats):  # alternate the two cases
            for name in sizes:
                results[name].append(run_child({"shape": args.shape, "store": stores[name], "steps": args.steps,
                                                "threads": args.threads, "eval_every": args.eval_every,
                                                "pages": args.pages}))
    for name, runs in results.items():
        peak = statistics.median(r["peak_rss_mib"] for r in runs)
        each = ", ".join(f"{r['peak_rss_mib']:.1f}" for r in runs)
        print(f"{name}: peak RSS {peak:.1f} MiB (runs: {each}); "
              f"at exit file-backed {runs[-1]['rss_file_mib']:.1f} MiB, anonymous {runs[-1]['rss_anon_mib']:.1f} MiB")
    small = statistics.median(r["peak_rss_mib"] for r in results["1MB"])
    large = statistics.median(r["peak_rss_mib"] for r in results["100MB"])
    print(f"100MB / 1MB peak RSS: {large / small:.3f} ({large - small:+.1f} MiB)")


def checkpointing(args) -> None:
    for shape in args.shapes:
        results = {False: [], True: []}
        for _ in range(args.repeats):
            for ck in (False, True):
                results[ck].append(run_child({"shape": shape, "steps": args.steps, "threads": args.threads,
                                              "checkpointing": ck}))
        row = {}
        for ck, runs in results.items():
            row[ck] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        a, b = row[False], row[True]
        print(f"{shape} {SHAPES[shape]}: peak RSS {a['peak_rss_mib']:.1f} -> {b['peak_rss_mib']:.1f} MiB "
              f"({b['peak_rss_mib'] - a['peak_rss_mib']:+.1f}); activations (the threads' workspaces) "
              f"{a['activation_mib']:.1f} -> {b['activation_mib']:.1f} MiB", flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        print(json.dumps(gpt2_child(spec) if spec.get("gpt2") else child(spec)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("datastore", help="peak RSS training on ~1 MB vs ~100 MB of tokens")
    d.add_argument("--shape", choices=sorted(SHAPES), default="default")
    d.add_argument("--steps", type=int, default=200)
    d.add_argument("--eval-every", type=int, default=50)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--repeats", type=int, default=2)
    d.add_argument("--pages", choices=("keep", "random", "release"), default="keep",
                   help="madvise advice for the store's maps (see AdvisedStore)")
    c = sub.add_parser("checkpointing", help="peak RSS and step time with and without gradient checkpointing")
    c.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["baby", "medium"])
    c.add_argument("--steps", type=int, default=8)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--repeats", type=int, default=2)
    g = sub.add_parser("gpt2", help="GPT-2 family shapes: peak RSS and tokens/s, cllmd and PyTorch alternating")
    g.add_argument("--shape", choices=[k for k in SHAPES if k.startswith("gpt2")], default="gpt2-256-bytes")
    g.add_argument("--batch", type=int, default=12)
    g.add_argument("--steps", type=int, default=3, help="steps per child (the first is not timed)")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--repeats", type=int, default=1)
    g.add_argument("--checkpointing", action="store_true")
    g.add_argument("--no-torch", action="store_true")
    args = p.parse_args()
    {"datastore": datastore, "checkpointing": checkpointing, "gpt2": gpt2}[args.what](args)


if __name__ == "__main__":
    main()
