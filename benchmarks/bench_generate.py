"""Generation benchmark: decode tokens/s, float32, int8 and bf16 weights, against PyTorch / transformers.

    .venv/bin/python benchmarks/bench_generate.py                      # baby config, 400 tokens, 5 rounds
    .venv/bin/python benchmarks/bench_generate.py --model default      # the daemon's default model shape
    .venv/bin/python benchmarks/bench_generate.py --model gpt2 --threads 2 --tokens 64 --rounds 3
    .venv/bin/python benchmarks/bench_generate.py --streams 8 --tokens 300 --rounds 3   # through the daemon
    .venv/bin/python benchmarks/bench_generate.py --streams 8 --model gpt2 --threads 2 --tokens 48 --rounds 3
    .venv/bin/python benchmarks/bench_generate.py --accuracy MODEL.cllm      # int8's and bf16's accuracy cost

bf16 columns appear where MKL is installed (the extra cllmd[mkl]).

baby/default: times ways of producing greedy tokens, alternating rounds so a noisy machine
affects all alike, and prints medians: cllmd's Decoder with float32, int8 and bf16 weights (one
position per token against the KV cache), the full Generation iterator (sampling, UTF-8
streaming, stop handling included), and a KV-cache decoder of the identical model in PyTorch.

gpt2: GPT-2 small's shape (12 layers, 768 wide, context 1024, vocabulary 50257) with the random
weights of a transformers GPT2LMHeadModel, saved by a worker process that runs transformers
alone (PyTorch's OpenMP threads never share the cores with numba's in one process) and read
into a cllmd Model here: single-sequence decode tokens/s of cllmd int8, bf16 and float32 and
GPT2LMHeadModel.generate (greedy, its KV cache), 8 sequences decoded together by cllmd
(Decoder.advance, no daemon), and a 1,000-token prompt's pass (--prompt): prompt tokens/s and
time to the first token. Rounds alternate between all of them. Speed does not depend on what
a model learned, so random weights do. convert_*_seconds: int8 quantization and bf16
rounding of the weights at load.

--streams N: a real `cllmd serve` with the default shape (--model gpt2: GPT-2 small's; bytes
tokenizer, random weights), float32, int8 (and bf16) weights: aggregate tokens/s of N concurrent streamed generations (decoded together, one
pass per step) against one stream alone, alternating rounds. Every stream generates its full
--tokens: the seeds are ones whose text reaches no end-of-text token before (found in process
on the same weights first, checked by each stream's stop reason), so N streams stay N for
every step; with the first seeds instead (--any-seeds) some streams end early and the
batch shrinks (at the default shape, 300 tokens: about 5 of 8 on average).

--accuracy MODEL.cllm: perplexity of a trained model on the held-out end of --text with float32,
int8 (and bf16) weights, and the share of positions where each picks float32's likeliest token.
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

from cllmd.generate import Decoder, Generation, KVCache, SamplingOptions, Sequence
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


def model_from_safetensors(directory: Path) -> Model:
    """A cllmd Model holding a transformers GPT2LMHeadModel's saved weights (same names, Conv1D layout).

    Read with safetensors' numpy loader rather than `cllmd import`: a random-weight checkpoint
    comes with no tokenizer, which the import requires (and decoding speed does not depend on one)."""
    from safetensors.numpy import load_file
    c = json.loads((directory / "config.json").read_text())
    cfg = ModelConfig(vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                      block_size=c["n_positions"])
    model = Model(cfg, seed=0)
    state = load_file(str(directory / "model.safetensors"))
    for name, view in model.params.items():
        view[...] = state["transformer." + (name + ".weight" if name in ("wte", "wpe") else name)]
    return model


def transformers_worker(args) -> None:
    """--transformers-worker DIR: GPT2LMHeadModel(GPT2Config()) with seed-0 random weights, saved
    to DIR, then timed on request (one JSON line per command on stdin): its own process, so
    PyTorch's and numba's OpenMP thread pools never share the cores while either one is timed."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    hf.save_pretrained(args.transformers_worker)
    print(json.dumps({"ready": True}), flush=True)
    with torch.no_grad():
        for line in sys.stdin:
            cmd = json.loads(line)
            ids = torch.tensor([cmd["prompt"]])
            t = time.perf_counter()
            if cmd["op"] == "decode":
                n = cmd["tokens"]
                out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                  pad_token_id=0, attention_mask=torch.ones_like(ids))
                reply = {"tps": n / (time.perf_counter() - t), "tokens": out[0, ids.shape[1]:].tolist()}
            else:   # the prompt's pass, filling the cache
                hf(ids, use_cache=True)
                reply = {"tps": ids.shape[1] / (time.perf_counter() - t), "seconds": time.perf_counter() - t}
            print(json.dumps(reply), flush=True)


def gpt2_main(args) -> dict:
    """GPT-2 small: cllmd's weights (int8, bf16, float32) here, transformers in its own process."""
    import subprocess
    import tempfile
    import numba
    from cllmd.kernels import blas
    numba.set_num_threads(args.threads)
    kinds = ["int8"] + (["bf16"] if blas.MKL_AVAILABLE else []) + ["float32"]
    if "bf16" not in kinds:
        print("MKL not found: no bf16 column (pip install 'cllmd[mkl]')", file=sys.stderr)
    tmp = tempfile.TemporaryDirectory()
    worker = subprocess.Popen([sys.executable, __file__, "--transformers-worker", tmp.name, "--threads",
                               str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(**cmd) -> dict:
        worker.stdin.write(json.dumps(cmd) + "\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())

    try:
        assert json.loads(worker.stdout.readline())["ready"]
        model = model_from_safetensors(Path(tmp.name))
        convert = {}
        for kind in kinds[:-1]:          # converted once per model, at the first Decoder
            t0 = time.perf_counter()
            Decoder(model, kind)
            convert[kind] = time.perf_counter() - t0
        prompt = [int(t) for t in np.random.default_rng(1).integers(0, model.cfg.vocab_size, 16)]
        long_prompt = [int(t) for t in np.random.default_rng(2).integers(0, model.cfg.vocab_size, args.prompt)]

        def cllmd_prompt(kind) -> tuple[float, float]:
            g = Generation(model, long_prompt, SamplingOptions(temperature=0, max_tokens=1, stop_at_eot=False),
                           weights=kind)
            g.text()
            return len(long_prompt) / g.stats.prefill_seconds, g.stats.time_to_first_token

        def cllmd_batch(kind, S=8) -> float:
            """S sequences decoded together in one Decoder.advance per step (no daemon), tokens/s."""
            dec = Decoder(model, kind)
            seqs = [Sequence(model, prompt, SamplingOptions(temperature=0.8, seed=i, max_tokens=args.tokens + 1,
                                                            stop_at_eot=False)) for i in range(S)]
            dec.advance(seqs)             # the prompts' pass
            t, n = time.perf_counter(), 0
            while not all(q.done for q in seqs):
                live = [q for q in seqs if not q.done]
                dec.advance(live)
                n += len(live)
            return n / (time.perf_counter() - t)

        rows = {k: [] for k in [*kinds, "transformers", *[f"batch8_{k}" for k in kinds],
                                *[f"prompt_{k}" for k in kinds], "prompt_transformers"]}
        ttft = {k: [] for k in [*kinds, "transformers"]}
        agree = {}
        with threadpool_limits(args.threads):
            for kind in kinds:             # warm up (numba's cache, first-call allocations)
                decoder_round(model, prompt, 4, kind)
                cllmd_batch(kind, 2)
            ask(op="decode", prompt=prompt, tokens=4)
            for _ in range(args.rounds):
                toks = {}
                for kind in kinds:
                    tps, toks[kind] = decoder_round(model, prompt, args.tokens, kind)
                    rows[kind].append(tps)
                r = ask(op="decode", prompt=prompt, tokens=args.tokens)
                rows["transformers"].append(r["tps"])
                agree = {f"{k}_vs_transformers": sum(a == b for a, b in zip(toks[k], r["tokens"])) / args.tokens
                         for k in kinds}
                for kind in kinds:
                    rows[f"batch8_{kind}"].append(cllmd_batch(kind))
            for _ in range(args.rounds):
                for kind in kinds:
                    tps, first = cllmd_prompt(kind)
                    rows[f"prompt_{kind}"].append(tps)
                    ttft[kind].append(first)
                r = ask(op="prompt", prompt=long_prompt)
                rows["prompt_transformers"].append(r["tps"])
                ttft["transformers"].append(r["seconds"])
    finally:
        worker.stdin.close()
        worker.wait(60)
        tmp.cleanup()
    out = {"model": "gpt2", "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
           "prompt_tokens": args.prompt, **{f"convert_{k}_seconds": round(v, 2) for k, v in convert.items()}}
    for name, values in rows.items():
        out[f"{name}_tokens_per_second"] = round(statistics.median(values), 1)
    for name, values in ttft.items():
        out[f"time_to_first_token_{name}_seconds"] = round(statistics.median(values), 3)
    hf_tps, hf_prompt = out["transformers_tokens_per_second"], out["prompt_transformers_tokens_per_second"]
    for kind in kinds:
        out[f"ratio_{kind}_vs_transformers"] = round(out[f"{kind}_tokens_per_second"] / hf_tps, 2)
        out[f"ratio_{kind}_vs_float32"] = round(out[f"{kind}_tokens_per_second"] / out["float32_tokens_per_second"], 2)
        out[f"ratio_batch8_{kind}_vs_one"] = round(out[f"batch8_{kind}_tokens_per_second"]
                                                   / out[f"{kind}_tokens_per_second"], 2)
        out[f"ratio_prompt_{kind}_vs_transformers"] = round(out[f"prompt_{kind}_tokens_per_second"] / hf_prompt, 2)
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
    nll = {k: 0.0 for k in _kinds()}
    same = {k: 0 for k in nll if k != "float32"}
    count = 0
    for w in windows:
        top = {}
        for kind in nll:
            logits = Decoder(model, kind).forward([KVCache(model)], [w[:T]], every=True).astype(np.float64)
            logp = logits - logits.max(axis=1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
            nll[kind] += -logp[np.arange(T), w[1:T + 1]].sum()
            top[kind] = logits.argmax(axis=1)
        for kind in same:
            same[kind] += int((top["float32"] == top[kind]).sum())
        count += T
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    out = {"model": str(args.accuracy), "text": str(args.text), "held_out_tokens": len(held), "windows": len(windows),
           "positions": count, **{f"perplexity_{k}": round(v, 4) for k, v in ppl.items()}}
    for kind in same:
        out[f"perplexity_increase_percent_{kind}"] = round(100 * (ppl[kind] / ppl["float32"] - 1), 3)
        out[f"greedy_top1_agreement_{kind}"] = round(same[kind] / count, 4)
    return out


def _kinds() -> list[str]:
    """The inference weights measured: bf16 only where MKL is."""
    from cllmd.kernels import blas
    return ["float32", "int8"] + (["bf16"] if blas.MKL_AVAILABLE else [])


def streams_main(args) -> dict:
    """Concurrent streams through a real daemon (continuous batching) against one stream alone."""
    import tempfile
    sys.path.insert(0, str(HERE.parent))
    from tests.daemonproc import Daemon
    if args.model == "gpt2":   # GPT-2 small's shape, random weights, the bytes tokenizer
        cfg = ModelConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    else:
        cfg = ModelConfig(**{**SHAPES["default"], "vocab_size": 257})
    big = args.model == "gpt2"
    out = {"model": f"{'gpt2' if big else 'default'} (bytes tokenizer)", "streams": args.streams,
           "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads if big else "daemon default"}
    threads = {"NUMBA_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)} if big else {}
    for weights in args.weights or _kinds():
        with tempfile.TemporaryDirectory() as tmp:
            d = Daemon(Path(tmp), "--no-train-auto-train", "--server-generate-workers", str(args.streams),
                       "--inference-weights", weights, "--model-n-layer", str(cfg.n_layer), "--model-n-head",
                       str(cfg.n_head), "--model-n-embd", str(cfg.n_embd), "--model-block-size",
                       str(cfg.block_size), model=False, env=threads)
            d.state.mkdir(parents=True)
            m = Model(cfg, seed=0, tokenizer=BytesTokenizer())
            if not big:   # nudged off the init so attention is not uniform (GPT-2's init is varied enough)
                m.flat += np.random.default_rng(0).normal(0.0, 0.05, m.flat.shape).astype(np.float32)
            m.save(d.state / "model.cllm")
            seeds = (list(range(args.streams)) if args.any_seeds
                     else full_length_seeds(m, weights, args.tokens, args.streams))
            del m
            d.start()
            try:
                out.update(_streams_rounds(args, d, weights, seeds))
            finally:
                d.stop()
    return out


STREAM_PROMPT = "The "


def full_length_seeds(model: Model, weights: str, tokens: int, count: int) -> list[int]:
    """The first count seeds whose generation from STREAM_PROMPT (the daemon's defaults,
    temperature 0.8) runs to max_tokens without an end-of-text token, in process."""
    seeds, seed = [], 0
    while len(seeds) < count:
        if seed >= 50 * count:
            raise RuntimeError(f"fewer than {count} of {seed} seeds run {tokens} tokens without "
                               f"an end-of-text token: use --any-seeds or fewer --tokens")
        g = Generation(model, STREAM_PROMPT, SamplingOptions(max_tokens=tokens, temperature=0.8, seed=seed),
                       weights=weights)
        g.text()
        if g.stats.stop_reason == "max_tokens":
            seeds.append(seed)
        seed += 1
    return seeds


def _streams_rounds(args, d, weights: str, seeds: list[int]) -> dict:
    import threading
    clients = [d.connect() for _ in range(args.streams)]
    short = []   # streams that ended before max_tokens

    def one(c, i, done):
        g = c.generate(STREAM_PROMPT, max_tokens=args.tokens, temperature=0.8, seed=seeds[i])
        for _ in g:
            pass
        done.append((g.stats["tokens_generated"], time.perf_counter()))
        if g.stats["tokens_generated"] < args.tokens:
            short.append(g.stats["stop_reason"])

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
    if short and not args.any_seeds:
        raise RuntimeError(f"{len(short)} streams ended before {args.tokens} tokens ({short}): the "
                           f"seeds were not found on the daemon's weights")
    return {f"{weights}_one_stream_tokens_per_second": round(statistics.median(single), 1),
            f"{weights}_{args.streams}_streams_tokens_per_second": round(statistics.median(many), 1),
            f"{weights}_ratio": round(statistics.median(many) / statistics.median(single), 2),
            f"{weights}_largest_batch": batch["largest_batch"],
            f"{weights}_last_steps_seconds": batch["step_seconds"],   # the daemon's own, the last round's end
            f"{weights}_seeds": seeds}


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
    p.add_argument("--any-seeds", action="store_true",
                   help="--streams: seeds 0, 1, ... even where a stream ends early at an end-of-text token")
    p.add_argument("--weights", type=lambda s: s.split(","), metavar="KIND[,KIND]",
                   help="--streams: only these weight kinds (default: float32, int8 and bf16 where MKL is)")
    p.add_argument("--transformers-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.transformers_worker:
        transformers_worker(args)
        return
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
    rows = {"decoder": [], "decoder_int8": [], "decoder_bf16": [], "generation": [], "torch": []}
    kinds = _kinds()
    import numba
    numba.set_num_threads(args.threads)
    if ref is not None:
        torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        decoder_round(model, prompt, 20)  # warm up (numba cache load)
        decoder_round(model, prompt, 20, "int8")
        if "bf16" in kinds:
            decoder_round(model, prompt, 20, "bf16")
        if ref is not None:
            ref(prompt, 20)
        for _ in range(args.rounds):
            tps, ours = decoder_round(model, prompt, args.tokens)
            rows["decoder"].append(tps)
            rows["decoder_int8"].append(decoder_round(model, prompt, args.tokens, "int8")[0])
            if "bf16" in kinds:
                rows["decoder_bf16"].append(decoder_round(model, prompt, args.tokens, "bf16")[0])
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
