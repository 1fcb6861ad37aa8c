"""Generation benchmark: tokens/s of KV-cache decoding, against recomputing the context and PyTorch.

    .venv/bin/python benchmarks/bench_generate.py                      # baby config, 400 tokens, 5 rounds
    .venv/bin/python benchmarks/bench_generate.py --model default      # the daemon's default model shape

Times three ways of producing the same greedy tokens, alternating rounds so a noisy machine
affects all alike, and prints medians: cllmd's Decoder (one position per token against the KV
cache), the full Generation iterator (sampling, UTF-8 streaming, stop handling included), and,
when PyTorch is installed, a KV-cache decoder of the identical model in PyTorch (one thread).
The model has random weights: speed does not depend on what it learned.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from cllmd.generate import Decoder, Generation, SamplingOptions
from cllmd.model import Model, ModelConfig
from cllmd.tokenizer import BytesTokenizer

HERE = Path(__file__).resolve().parent
SHAPES = {
    "baby": dict(vocab_size=257, n_layer=4, n_head=4, n_embd=128, block_size=64),     # nanoGPT's CPU config
    "default": dict(vocab_size=4096, n_layer=4, n_head=4, n_embd=128, block_size=128),  # cllmd.toml defaults
}


def decoder_round(model: Model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Greedy decoding with the KV cache; the window slides as Generation does."""
    block = model.cfg.block_size
    dec = Decoder(model)
    history = list(prompt)
    logits = dec.prefill(history[-block:])
    t0 = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(logits))
        history.append(token)
        if dec.cache.length == block:
            logits = dec.prefill(history[-(block // 2):])
        else:
            logits = dec.step(token)
    return n / (time.perf_counter() - t0), history[len(prompt):]


def generation_round(model: Model, prompt: list[int], n: int) -> float:
    g = Generation(model, prompt, SamplingOptions(temperature=0.8, top_k=40, max_tokens=n, seed=1,
                                                  stop_at_eot=False))
    for _ in g:
        pass
    return g.stats.tokens_per_second


def torch_decoder(model: Model):
    """A KV-cache greedy decoder of the same weights in PyTorch (benchmark only)."""
    import torch
    import torch.nn.functional as F
    cfg = model.cfg
    P = {k: torch.tensor(np.array(v)) for k, v in model.params.items()}
    C, NH = cfg.n_embd, cfg.n_head
    hs = C // NH

    @torch.no_grad()
    def run(prompt: list[int], n: int) -> tuple[float, list[int]]:
        block = cfg.block_size
        history = list(prompt)

        def forward(tokens, pos0, cache):
            x = P["wte"][tokens] + P["wpe"][pos0:pos0 + len(tokens)]
            T = len(tokens)
            for l in range(cfg.n_layer):
                p = f"h.{l}."
                h = F.layer_norm(x, (C,), P[p + "ln_1.weight"], P[p + "ln_1.bias"], 1e-5)
                q, k, v = (h @ P[p + "attn.c_attn.weight"] + P[p + "attn.c_attn.bias"]).split(C, dim=1)
                k, v = k.view(T, NH, hs).transpose(0, 1), v.view(T, NH, hs).transpose(0, 1)
                if cache[l] is not None:
                    k, v = torch.cat([cache[l][0], k], 1), torch.cat([cache[l][1], v], 1)
                cache[l] = (k, v)
                y = F.scaled_dot_product_attention(q.view(T, NH, hs).transpose(0, 1), k, v, is_causal=pos0 == 0)
                x = x + y.transpose(0, 1).reshape(T, C) @ P[p + "attn.c_proj.weight"] + P[p + "attn.c_proj.bias"]
                h = F.layer_norm(x, (C,), P[p + "ln_2.weight"], P[p + "ln_2.bias"], 1e-5)
                h = F.gelu(h @ P[p + "mlp.c_fc.weight"] + P[p + "mlp.c_fc.bias"], approximate="tanh")
                x = x + h @ P[p + "mlp.c_proj.weight"] + P[p + "mlp.c_proj.bias"]
            x = F.layer_norm(x[-1:], (C,), P["ln_f.weight"], P["ln_f.bias"], 1e-5)
            return (x @ P["wte"].T)[0]

        cache = [None] * cfg.n_layer
        context = history[-block:]
        logits = forward(torch.tensor(context), 0, cache)
        length = len(context)
        t0 = time.perf_counter()
        for _ in range(n):
            token = int(torch.argmax(logits))
            history.append(token)
            if length == block:
                cache = [None] * cfg.n_layer
                context = history[-(block // 2):]
                logits = forward(torch.tensor(context), 0, cache)
                length = len(context)
            else:
                logits = forward(torch.tensor([token]), length, cache)
                length += 1
        return n / (time.perf_counter() - t0), history[len(prompt):]

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="baby")
    p.add_argument("--tokens", type=int, default=400, help="tokens generated per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    cfg = ModelConfig(**SHAPES[args.model])
    model = Model(cfg, seed=0, tokenizer=BytesTokenizer() if cfg.vocab_size == 257 else None)
    # nudge the weights off the init so attention is not uniform and logits are not flat
    model.flat += np.random.default_rng(0).normal(0.0, 0.05, model.flat.shape).astype(np.float32)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, min(cfg.vocab_size, 256), 16)]
    try:
        ref = torch_decoder(model)
        import torch
        torch.set_num_threads(1)
    except ImportError:
        ref = None
        print("PyTorch is not installed: timing cllmd alone", file=sys.stderr)
    rows = {"decoder": [], "generation": [], "torch": []}
    with threadpool_limits(1):
        decoder_round(model, prompt, 20)  # warm up (numba cache load)
        if ref is not None:
            ref(prompt, 20)
        for _ in range(args.rounds):
            tps, ours = decoder_round(model, prompt, args.tokens)
            rows["decoder"].append(tps)
            rows["generation"].append(generation_round(model, prompt, args.tokens))
            if ref is not None:
                tps, theirs = ref(prompt, args.tokens)
                rows["torch"].append(tps)
                same = sum(a == b for a, b in zip(ours, theirs))
                if same < len(ours):  # float rounding may flip a near tie, then the paths diverge
                    print(f"note: greedy tokens agree on the first {same}/{len(ours)} positions", file=sys.stderr)
    out = {"model": args.model, "tokens": args.tokens, "rounds": args.rounds}
    for name, values in rows.items():
        if values:
            out[f"{name}_tokens_per_second"] = round(statistics.median(values), 1)
    if rows["torch"]:
        out["ratio_decoder_vs_torch"] = round(out["decoder_tokens_per_second"] / out["torch_tokens_per_second"], 2)
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
