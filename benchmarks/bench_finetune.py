"""Fine-tuning an imported model: today's from-scratch defaults against the fine-tuning defaults.

    flock /work/tools/.bench.lock .venv/bin/python benchmarks/bench_finetune.py --seeds 1 2

No pretrained weights can be downloaded here, so the benchmark makes one. It pretrains a small
GPT-2-shaped model (cllmd's default shape, 4 layers, 128 wide, block 128, byte-level BPE of
2,048 tokens trained on the pretraining text) on domain A, writes it as a Hugging Face
directory with `cllmd export`'s code, and imports that with `cllmd import`'s, so the model
starts as a downloaded checkpoint does: weights only, AdamW's moments fresh.

Then it does what the daemon does with the files a user drops, with each configuration:
  1. domain B arrives (the first file): one pass over it, in the daemon's data store through
     its replay mix, as auto-training would;
  2. domain C arrives: one pass over C, replaying the older data (B) at replay_fraction.
Same seeds, same data, same step budget for every configuration (one pass at 12 rows of 128
tokens per step). It prints validation loss on held-out text of each domain before and after
each phase: the new domain's loss is what fine-tuning is for, the old domains' rise is the
forgetting.

Domains, all found on this machine:
  A: tinyshakespeare (../shared/data), its last 10% held out;
  B: Python's language reference (the topics of the standard library's pydoc_data);
  C: the licence texts of /usr/share/common-licenses;
B and C are cut into documents of about 4,000 characters at paragraph breaks, and every 10th
document is held out for validation.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cllm.catalogue import FINETUNE, SETTINGS
from cllmd.datastore import DataStore
from cllmd.hf import export_hf, import_hf
from cllmd.model import Model, ModelConfig
from cllmd.tokenizer import train_bpe
from cllmd.tokensource import ReplayMix, TokenArraySource
from cllmd.trainer import TrainConfig, Trainer

HERE = Path(__file__).resolve().parent
SHAKESPEARE = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
LICENSES = Path("/usr/share/common-licenses")
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)   # cllmd.toml's default shape
VOCAB = 2048
BATCH = 12
DOC_CHARS = 4000
EVAL_WINDOWS = 120   # fixed windows of 128 tokens per held-out domain
KEYS = ("lr", "min_lr", "warmup", "decay_end_step", "replay_fraction")


def scratch_defaults() -> dict:
    """Today's defaults: what a model trained from scratch gets (the catalogue's)."""
    return {k: SETTINGS[f"train.{k}"].default for k in KEYS}


def configurations() -> dict[str, dict]:
    """The two the question is about, and variations of the fine-tuning defaults that each
    change one of them, so that each part shows its own effect."""
    scratch = scratch_defaults()
    tune = {**scratch, **{k: v for k, v in FINETUNE.items() if k in KEYS}}
    return {
        "from-scratch defaults": scratch,
        "fine-tuning defaults": tune,
        "  with lr 1e-4": {**tune, "lr": 1e-4, "min_lr": 1e-5},
        "  with no warmup": {**tune, "warmup": 0},
        "  with warmup 100": {**tune, "warmup": 100},
        "  with replay 0.25": {**tune, "replay_fraction": scratch["replay_fraction"]},
    }


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


# ---- the domains ------------------------------------------------------------------------------

def documents(text: str) -> list[str]:
    """text cut at paragraph breaks into documents of about DOC_CHARS characters."""
    docs, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= DOC_CHARS:
            docs.append(cur)
            cur = ""
    if cur.strip():
        docs.append(cur)
    return docs


def python_reference() -> str:
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def licences() -> str:
    if not LICENSES.is_dir():
        sys.exit(f"{LICENSES} is missing (Debian's base-files installs it)")
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


class Domain:
    """A domain's documents, tokenized: the training ones and the held-out (every 10th)."""

    def __init__(self, name: str, text: str, tok):
        self.name = name
        docs = documents(text)
        enc = [np.concatenate([tok.encode(d), [tok.eot_id]]).astype(np.uint16) for d in docs]
        self.train = [e for i, e in enumerate(enc) if i % 10 != 9]
        self.val = TokenArraySource(np.concatenate([e for i, e in enumerate(enc) if i % 10 == 9]), 0.0)
        self.train_tokens = sum(len(e) for e in self.train)


# ---- training ---------------------------------------------------------------------------------

def val_loss(trainer: Trainer, source: TokenArraySource) -> float:
    """The loss of the trainer's current weights on the fixed windows of held-out tokens (the
    source's only split, "train"), through the trainer's own evaluation pass."""
    own, trainer.source = trainer.source, source
    try:
        return trainer.evaluate(split="train")["train_loss"]
    finally:
        trainer.source = own


def pretrain(tok, a_tokens: np.ndarray, steps: int, threads: int, out: Path) -> tuple[float, float]:
    cfg = ModelConfig(vocab_size=tok.vocab_size, **SHAPE)
    source = TokenArraySource(a_tokens, 0.1)
    tc = TrainConfig(batch_size=BATCH, lr=1e-3, min_lr=1e-4, warmup=100, decay_end_step=steps, seed=1337)
    trainer = Trainer(Model(cfg, seed=1337, tokenizer=tok), source, tc, threads=threads)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    seconds = time.perf_counter() - t0
    loss = trainer.evaluate()["val_loss"]
    trainer.model.save(out)
    trainer.close()
    return loss, seconds


def store_of(directory: Path, vocab_size: int) -> DataStore:
    # every document the benchmark appends is a training one (it holds its own validation text)
    return DataStore(directory, vocab_size, val_every=2**40)


def append(store: DataStore, docs: list[np.ndarray], name: str) -> int:
    """Appends docs; returns the train stream's offset where they begin."""
    since = store.num_tokens("train")
    for i, d in enumerate(docs):
        store.append(d, source=f"{name}-{i}", sha256=hashlib.sha256(d.tobytes() + name.encode()).hexdigest())
    return since


def finetune(model_path: Path, conf: dict, seed: int, held_out: dict[str, TokenArraySource],
             arriving: list[Domain], threads: int, work: Path) -> dict:
    """The domains in `arriving` dropped one after the other, each learnt for one pass as the
    daemon's auto-training does; the held-out losses of every domain before and after each."""
    model = Model.load(model_path)
    store = store_of(work / f"store-{seed}-{abs(hash(json.dumps(conf, sort_keys=True)))}", model.cfg.vocab_size)
    mix = ReplayMix(store, conf["replay_fraction"])
    tc = TrainConfig(batch_size=BATCH, seed=seed, eval_windows=EVAL_WINDOWS,
                     **{k: conf[k] for k in KEYS if k != "replay_fraction"})
    trainer = Trainer(model, mix, tc, threads=threads)
    T = model.cfg.block_size
    out = {"before": {n: val_loss(trainer, src) for n, src in held_out.items()}}
    t0 = time.perf_counter()
    for d in arriving:
        mix.since = append(store, d.train, d.name)   # the controller's add_tokens: learn from here on
        for _ in range(max(1, d.train_tokens // (BATCH * T))):
            trainer.step()
        mix.since = 0
        out[f"after {d.name}"] = {n: val_loss(trainer, src) for n, src in held_out.items()}
    out["seconds"] = time.perf_counter() - t0
    out["steps"] = trainer.step_num
    trainer.close()
    store.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", help="configurations to run (default: all)")
    args = p.parse_args()
    if not SHAKESPEARE.exists():
        sys.exit(f"{SHAKESPEARE} is missing")
    print(f"start: {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(tmp)
        tok = train_bpe(SHAKESPEARE, VOCAB)
        a_tokens = tok.encode(SHAKESPEARE.read_text(encoding="utf-8")).astype(np.uint16)
        b, c = Domain("B", python_reference(), tok), Domain("C", licences(), tok)
        held_out = {"A": TokenArraySource(a_tokens[int(len(a_tokens) * 0.9):], 0.0), "B": b.val, "C": c.val}
        print(f"tokens: A {len(a_tokens)} (pretraining), B {b.train_tokens} train, C {c.train_tokens} train; "
              f"vocabulary {tok.vocab_size}", flush=True)

        pre_loss, seconds = pretrain(tok, a_tokens, args.pretrain_steps, args.threads, work / "pretrained.cllm")
        export_hf(work / "pretrained.cllm", work / "hf")          # what `cllmd export` writes
        import_hf(work / "hf", work / "imported.cllm")             # what `cllmd import` reads
        print(f"pretrained on A: {args.pretrain_steps} steps in {seconds:.0f}s, A val loss {pre_loss:.4f}; "
              f"exported and imported", flush=True)

        confs = configurations()
        results = {}
        print(f"held-out loss, mean of seeds {args.seeds}")
        print(f"{'':24s} {'after B:':>8s} {'':8s} {'':7s}   {'after C:':>8s}")
        print(f"{'configuration':24s} {'B':>8s} {'A':>8s} {'A rise':>7s}   {'C':>8s} {'B':>8s} {'B rise':>7s} "
              f"{'A':>8s}   {'steps':>5s} {'time':>6s}")
        for name, conf in confs.items():
            if args.only and name not in args.only:
                continue
            runs = [finetune(work / "imported.cllm", conf, seed, held_out, [b, c], args.threads, work)
                    for seed in args.seeds]
            mean = {ph: {d: statistics.mean(r[ph][d] for r in runs) for d in "ABC"}
                    for ph in ("before", "after B", "after C")}
            results[name] = {"config": conf, "runs": runs, "mean": mean}
            m0, m1, m2 = mean["before"], mean["after B"], mean["after C"]
            print(f"{name:24s} {m1['B']:8.3f} {m1['A']:8.3f} {m1['A'] - m0['A']:+7.3f}   {m2['C']:8.3f} "
                  f"{m2['B']:8.3f} {m2['B'] - m1['B']:+7.3f} {m2['A']:8.3f}   {runs[0]['steps']:5d} "
                  f"{statistics.mean(r['seconds'] for r in runs):5.0f}s", flush=True)
        first = next(iter(results.values()))["mean"]["before"]
        print(f"before fine-tuning: A {first['A']:.3f} B {first['B']:.3f} C {first['C']:.3f}")
        print(f"end: {load()}")
        print(json.dumps({"pretrain_val_loss": pre_loss, "results": results}))


if __name__ == "__main__":
    main()
