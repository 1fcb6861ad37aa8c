"""Time and peak RSS of `cllmd import` and `cllmd export` at GPT-2 small's size (124M parameters),
side by side with transformers' from_pretrained + save_pretrained of the same files.

A random-weight GPT2LMHeadModel of GPT-2 small's shape (12 layers, width 768, context 1024,
vocabulary 50257) is written once with save_pretrained into a temporary directory, with a
small byte-level BPE tokenizer (a padded vocabulary, as cllmd allows). Each measurement runs in a
fresh process; the figures are medians over --rounds.

    .venv/bin/python benchmarks/bench_hf.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MAKE = r"""
import sys, torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
out = sys.argv[1]
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config()).save_pretrained(out, safe_serialization=True)
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 100],
                        trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
"""

HF_ROUND_TRIP = r"""
import sys, time, torch
from transformers import GPT2LMHeadModel
t0 = time.perf_counter()
m = GPT2LMHeadModel.from_pretrained(sys.argv[1], dtype=torch.float32)
t1 = time.perf_counter()
m.save_pretrained(sys.argv[2], safe_serialization=True)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def _peak_of(cmd: list[str]) -> tuple[float, float, str]:
    """Run cmd under a wrapper process of its own, so the peak RSS is this command's alone."""
    wrapper = ("import resource, subprocess, sys, time, json; t0 = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "s = time.perf_counter() - t0; "
               "print(json.dumps([r.returncode, s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
               "r.stdout, r.stderr]))")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    code, seconds, peak, stdout, stderr = json.loads(out.stdout)
    if code:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{stderr}")
    return seconds, peak, stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cllmd = [sys.executable, "-m", "cllmd.cli"]
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        tmp = Path(tmp)
        src = tmp / "gpt2-random"
        subprocess.run([sys.executable, "-c", MAKE, str(src)], check=True, capture_output=True)
        size = (src / "model.safetensors").stat().st_size
        rows = {k: [] for k in ("cllmd import", "cllmd export", "transformers from_pretrained + save_pretrained")}
        for r in range(args.rounds):
            out_cllm, out_dir, hf_out = tmp / f"m{r}.cllm", tmp / f"exp{r}", tmp / f"hf{r}"
            s, peak, out = _peak_of([*cllmd, "import", "--json", str(src), str(out_cllm)])
            rows["cllmd import"].append((s, json.loads(out)["seconds"], peak))
            s, peak, out = _peak_of([*cllmd, "export", "--json", str(out_cllm), str(out_dir)])
            rows["cllmd export"].append((s, json.loads(out)["seconds"], peak))
            s, peak, out = _peak_of([sys.executable, "-c", HF_ROUND_TRIP, str(src), str(hf_out)])
            load, save = map(float, out.split())
            rows["transformers from_pretrained + save_pretrained"].append((s, f"{load:.2f} + {save:.2f}", peak))
            out_cllm.unlink()
        print(f"GPT-2 small shape, random weights: model.safetensors {size / 2**20:.0f} MiB; medians of "
              f"{args.rounds} rounds, each in a fresh process")
        print(f"{'':<48}{'process s':>10}{'work s':>14}{'peak RSS MiB':>14}")
        for name, values in rows.items():
            work = values[len(values) // 2][1] if isinstance(values[0][1], str) else \
                f"{statistics.median(v[1] for v in values):.2f}"
            print(f"{name:<48}{statistics.median(v[0] for v in values):>10.2f}{work:>14}"
                  f"{statistics.median(v[2] for v in values):>14.0f}")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
