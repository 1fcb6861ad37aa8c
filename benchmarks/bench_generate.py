"""Generation benchmark: decode tokens/s, float32 and int8 weights, against PyTorch / transformers.

    .venv/bin/python benchmarks/bench_generate.py                      # baby config, 400 tokens, 5 rounds
    .venv/bin/python benchmarks/bench_generate.py --model default      # the daemon's default model shape
    .venv/bin/python benchmarks/bench_generate.py --model gpt2 --threads 2 --tokens 64 --rounds 3
    .venv/bin/python benchmarks/bench_generate.py --streams 8 --tokens 300 --rounds 3   # through the daemon
    .venv/bin/python benchmarks/bench_generate.py --accuracy MODEL.cllm              # int8's accuracy cost

baby/default: times ways of producing greedy tokens, alternating rounds so a noisy machine
affects all alike, and prints medians: cllmd's Decoder with float32 and with int8 weights (one
position per token against the KV cache), the full Generation iterator (sampling, UTF-8
streaming, stop handling included), and a KV-cache decoder of the identical model in PyTorch.

gpt2: GPT-2 small's shape (12 layers, 768 wide, context 1024, vocabulary 50257) with the random
weights of a transformers GPT2LMHeadModel, copied into a cllmd Model: single-sequence decode
tokens/s of cllmd int8, cllmd float32 and GPT2LMHeadModel.generate (greedy, its KV cache), and
the time of a 1,000-token prompt's pass (--prompt) for each. Speed does not depend on what a
model learned, so random weights do.

--streams N: a real `cllmd serve` with the default shape (bytes tokenizer), float32 then int8
weights: aggregate tokens/s of N concurrent streamed generations (decoded together, one pass
per step) against one stream alone, alternating rounds.

--accuracy MODEL.cllm: perplexity of a trained model on the held-out end of --text with float32
and with int8 weights, and the share of positions where both pick the same likeliest token.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from cllmd.generate import Decoder, Generation, KVCache, SamplingOptions
from cllmd.model import Model, ModelConfig
from cllmd.tokenizer import BytesTokenizer

HERE = Path(__file__).resolve().parent
SHAPES = {
    "baby": dict(vocab_size=257, n_layer=4, n_head=4, n_embd=128, block_size=64),     # nanoGPT's CPU config
    "default": dict(vocab_size=4096, n_layer=4, n_head=4, n_embd=128, block_size=128),  # cllmd.toml defaults
    "gpt2": None,  # GPT-2 small, from transformers (gpt2_main)
}


def decoder_round(model: Model, prompt: list[int], n: int, weights: str = "float32") -> tuple[float, list[int]]:
    """Greedy decoding with the KV cache; the window slides as Generation does."""
    block = model.cfg.block_size
    dec = Decoder(model, weights)
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


def model_from_transformers(hf) -> Model:
    """A cllmd Model holding a transformers GPT2LMHeadModel's weights (same names, Conv1D layout).

    Copied in memory rather than through `cllmd import`: a random-weight checkpoint comes with no
    tokenizer, which the import requires (and decoding speed does not depend on one)."""
    c = hf.config
    cfg = ModelConfig(vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                      block_size=c.n_positions)
    model = Model(cfg, seed=0)
    state = hf.state_dict()
    for name, view in model.params.items():
        view[...] = state["transformer." + (name + ".weight" if name in ("wte", "wpe") else name)].numpy()
    return model


def gpt2_main(args) -> dict:
    import numba
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    hf = GPT2LMHeadModel(GPT2Config()).eval()      # GPT-2 small's shape, random weights
    model = model_from_transformers(hf)
    t0 = time.perf_counter()
    Decoder(model, "int8")
    quantize_s = time.perf_counter() - t0
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, model.cfg.vocab_size, 16)]
    long_prompt = [int(t) for t in np.random.default_rng(2).integers(0, model.cfg.vocab_size, args.prompt)]

    @torch.no_grad()
    def hf_decode(n):
        ids = torch.tensor([prompt])
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                          pad_token_id=0, attention_mask=torch.ones_like(ids))
        return n / (time.perf_counter() - t), out[0, len(prompt):].tolist()

    @torch.no_grad()
    def hf_prompt():
        ids = torch.tensor([long_prompt])
        t = time.perf_counter()
        hf(ids, use_cache=True)
        return len(long_prompt) / (time.perf_counter() - t)

    def cllmd_prompt(weights):
        dec = Decoder(model, weights)
        t = time.perf_counter()
        dec.prefill(long_prompt)
        return len(long_prompt) / (time.perf_counter() - t)

    rows = {k: [] for k in ("int8", "float32", "transformers", "prompt_int8", "prompt_float32", "prompt_transformers")}
    agree = {}
    with threadpool_limits(args.threads):
        decoder_round(model, prompt, 4, "int8"), decoder_round(model, prompt, 4), hf_decode(4)  # warm up
        for _ in range(args.rounds):
            tps, toks8 = decoder_round(model, prompt, args.tokens, "int8")
            rows["int8"].append(tps)
            tps, toks32 = decoder_round(model, prompt, args.tokens)
            rows["float32"].append(tps)
            tps, toks_hf = hf_decode(args.tokens)
            rows["transformers"].append(tps)
            agree = {"float32_vs_transformers": sum(a == b for a, b in zip(toks32, toks_hf)) / len(toks32),
                     "int8_vs_float32": sum(a == b for a, b in zip(toks8, toks32)) / len(toks32)}
        for _ in range(args.rounds):
            rows["prompt_int8"].append(cllmd_prompt("int8"))
            rows["prompt_float32"].append(cllmd_prompt("float32"))
            rows["prompt_transformers"].append(hf_prompt())
    out = {"model": "gpt2", "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
           "prompt_tokens": args.prompt, "quantize_seconds": round(quantize_s, 2)}
    for name, values in rows.items():
        out[f"{name}_tokens_per_second"] = round(statistics.median(values), 1)
    out["ratio_int8_vs_transformers"] = round(out["int8_tokens_per_second"] / out["transformers_tokens_per_second"], 2)
    out["ratio_int8_vs_float32"] = round(out["int8_tokens_per_second"] / out["float32_tokens_per_second"], 2)
    out["ratio_prompt_int8_vs_transformers"] = round(out["prompt_int8_tokens_per_second"]
                                                     / out["prompt_transformers_tokens_per_second"], 2)
    out["greedy_agreement"] = agree  # of the last round's tokens, position by position
    return out


def accuracy_main(args) -> dict:
    """Perplexity on the last --val-fraction of a text, float32 against int8, and greedy top-1
    agreement: the share of positions where both weights' likeliest next token is the same."""
    model = Model.load(args.accuracy)
    text = Path(args.text).read_text(encoding="utf-8")
    ids = [int(i) for i in model.tokenizer.encode(text)]
    held = ids[int(len(ids) * (1 - args.val_fraction)):]
    T = model.cfg.block_size
    windows = [held[i:i + T + 1] for i in range(0, len(held) - T - 1, T)][:args.windows]
    nll = {"float32": 0.0, "int8": 0.0}
    same = count = 0
    for w in windows:
        top = {}
        for kind in nll:
            logits = Decoder(model, kind).forward([KVCache(model)], [w[:T]], every=True).astype(np.float64)
            logp = logits - logits.max(axis=1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
            nll[kind] += -logp[np.arange(T), w[1:T + 1]].sum()
            top[kind] = logits.argmax(axis=1)
        same += int((top["float32"] == top["int8"]).sum())
        count += T
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    return {"model": str(args.accuracy), "text": str(args.text), "held_out_tokens": len(held), "windows": len(windows),
            "positions": count, "perplexity_float32": round(ppl["float32"], 4), "perplexity_int8": round(ppl["int8"], 4),
            "perplexity_increase_percent": round(100 * (ppl["int8"] / ppl["float32"] - 1), 3),
            "greedy_top1_agreement": round(same / count, 4)}


def streams_main(args) -> dict:
    """Concurrent streams through a real daemon (continuous batching) against one stream alone."""
    import tempfile
    sys.path.insert(0, str(HERE.parent))
    from tests.daemonproc import Daemon
    shape = SHAPES["default"]
    out = {"model": "default (bytes tokenizer)", "streams": args.streams, "tokens": args.tokens, "rounds": args.rounds}
    for weights in ("float32", "int8"):
        with tempfile.TemporaryDirectory() as tmp:
            d = Daemon(Path(tmp), "--no-train-auto-train", "--server-generate-workers", str(args.streams),
                       "--inference-weights", weights, "--model-n-layer", "4", "--model-n-head", "4",
                       "--model-n-embd", "128", "--model-block-size", "128", model=False)
            d.state.mkdir(parents=True)
            m = Model(ModelConfig(**{**shape, "vocab_size": 257}), seed=0, tokenizer=BytesTokenizer())
            m.flat += np.random.default_rng(0).normal(0.0, 0.05, m.flat.shape).astype(np.float32)
            m.save(d.state / "model.cllm")
            d.start()
            try:
                out.update(_streams_rounds(args, d, weights))
            finally:
                d.stop()
    return out


def _streams_rounds(args, d, weights: str) -> dict:
    import threading
    clients = [d.connect() for _ in range(args.streams)]

    def one(c, i, done):
        g = c.generate("The ", max_tokens=args.tokens, temperature=0.8, seed=i)
        for _ in g:
            pass
        done.append((g.stats["tokens_generated"], time.perf_counter()))

    def run(k):
        done = []
        threads = [threading.Thread(target=one, args=(clients[i], i, done)) for i in range(k)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(n for n, _ in done) / (max(t for _, t in done) - t0)

    run(1)  # warm up (kernels compiled or loaded from the cache)
    single, many = [], []
    for _ in range(args.rounds):
        single.append(run(1))
        many.append(run(args.streams))
    batch = clients[0].request("status")["serving"]["batch"]
    for c in clients:
        c.close()
    return {f"{weights}_one_stream_tokens_per_second": round(statistics.median(single), 1),
            f"{weights}_{args.streams}_streams_tokens_per_second": round(statistics.median(many), 1),
            f"{weights}_ratio": round(statistics.median(many) / statistics.median(single), 2),
            f"{weights}_largest_batch": batch["largest_batch"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="baby")
    p.add_argument("--tokens", type=int, default=400, help="tokens generated per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="threads (numba, BLAS, PyTorch; default 1)")
    p.add_argument("--prompt", type=int, default=1000, help="gpt2: tokens of the prompt pass timed")
    p.add_argument("--json", action="store_true")
    p.add_argument("--accuracy", metavar="MODEL.cllm", help="measure int8's accuracy cost on this trained model")
    p.add_argument("--text", default=str(HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"),
                   help="--accuracy: the text whose last --val-fraction is held out")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--windows", type=int, default=200, help="--accuracy: context-long windows scored at most")
    p.add_argument("--streams", type=int, default=0, help="concurrent streams through a real daemon, against one")
    args = p.parse_args()
    if args.streams:
        out = streams_main(args)
        print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
        return
    if args.accuracy:
        out = accuracy_main(args)
        print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
        return
    if args.model == "gpt2":
        out = gpt2_main(args)
        print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
        return
    cfg = ModelConfig(**SHAPES[args.model])
    model = Model(cfg, seed=0, tokenizer=BytesTokenizer() if cfg.vocab_size == 257 else None)
    # nudge the weights off the init so attention is not uniform and logits are not flat
    model.flat += np.random.default_rng(0).normal(0.0, 0.05, model.flat.shape).astype(np.float32)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, min(cfg.vocab_size, 256), 16)]
    try:
        ref = torch_decoder(model)
        import torch
    except ImportError:
        ref = None
        print("PyTorch is not installed: timing cllmd alone", file=sys.stderr)
    rows = {"decoder": [], "decoder_int8": [], "generation": [], "torch": []}
    import numba
    numba.set_num_threads(args.threads)
    if ref is not None:
        torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        decoder_round(model, prompt, 20)  # warm up (numba cache load)
        decoder_round(model, prompt, 20, "int8")
        if ref is not None:
            ref(prompt, 20)
        for _ in range(args.rounds):
            tps, ours = decoder_round(model, prompt, args.tokens)
            rows["decoder"].append(tps)
            rows["decoder_int8"].append(decoder_round(model, prompt, args.tokens, "int8")[0])
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
