"""Text generation with a KV cache: weights, decoding passes, sampling, stop strings, UTF-8 streaming.

Each new token costs one position's work: the prompt's positions go through one pass of matrix
products (filling the KV cache), and every further token attends to the cache. When the
context is full, the window slides: the last half is kept and run again. One pass may hold
positions of many sequences (Decoder.forward): the daemon decodes its active requests
together, reading each weight once per step for all of them. Weights are float32, int8
(per-group quantized, cllmd.kernels.q8) or bfloat16 (cllmd.kernels.bf16linear).
"""
from __future__ import annotations

import codecs
import math
import threading
import time
import dataclasses
from dataclasses import dataclass, field

import numpy as np
from numba.typed import List

from cllm.catalogue import INFERENCE_WEIGHTS, SAMPLING, check_sampling
from cllmd.kernels.bf16 import to_bf16
from cllmd.kernels.blas import gemm_bf16
from cllmd.kernels.gelu import gelu_forward
from cllmd.kernels.bf16linear import COLUMNS, BF16Weight, bf16_linear
from cllmd.kernels.kvattention import (GEMM_ROWS, batch_runs_parallel, kv_append_attention,
                                       kv_append_attention_batch, kv_attention_uses_gemm)
from cllmd.kernels.layernorm import layernorm_forward
from cllmd.kernels.q8 import PARALLEL_MIN_MACS, Q8Weight, q8_linear
from cllmd.kernels.sampling import sample_row_ref, sample_rows, sampling_scratch
from cllmd.model import LN_EPS, Model


def _option(name: str):
    return field(default=SAMPLING[name].default)


@dataclass
class SamplingOptions:
    """The sampling options of cllm.catalogue.SAMPLING (defaults, bounds and meaning there)."""
    max_tokens: int = _option("max_tokens")
    temperature: float = _option("temperature")        # 0 = greedy
    top_k: int = _option("top_k")                      # 0 = off
    top_p: float = _option("top_p")    # nucleus: smallest set of tokens whose probability reaches top_p
    min_p: float = _option("min_p")    # drop tokens below min_p * (probability of the likeliest)
    repeat_penalty: float = _option("repeat_penalty")  # > 1 discourages the last repeat_last_n tokens
    repeat_last_n: int = _option("repeat_last_n")
    seed: int | None = _option("seed")                 # None = a fresh one each time
    stop: tuple[str, ...] = _option("stop")  # generation ends before the first occurrence of any
    stop_at_eot: bool = True

    def __post_init__(self):
        self.stop = tuple(self.stop or ())
        problems = check_sampling(dataclasses.asdict(self))
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_args(cls, args: dict, defaults: dict | None = None) -> "SamplingOptions":
        """From generate's validated arguments (or any map holding the catalogue's names). An
        option not given (or nil) takes the model's own default (`defaults`: its
        generation_defaults, from a generation_config.json), else the catalogue's."""
        given = {k: v for k, v in args.items() if k in SAMPLING and v is not None}
        chosen = {**{k: v for k, v in (defaults or {}).items() if k in SAMPLING}, **given}
        return cls(**{k: (tuple(v or ()) if k == "stop" else v) for k, v in chosen.items()})


def sample_next(logits: np.ndarray, opts: SamplingOptions, rng: np.random.Generator,
                recent: list[int]) -> int:
    """Picks the next token id from one position's logits [V] (the numpy reference of sample_batch)."""
    u = rng.random() if opts.temperature != 0 else 0.0
    window = recent[-opts.repeat_last_n:] if opts.repeat_last_n else []
    return sample_row_ref(logits, opts.temperature, opts.top_k, opts.top_p, opts.min_p,
                          opts.repeat_penalty, window, u)


def sample_batch(logits: np.ndarray, seqs: list["Sequence"], vocab: int | None = None,
                 scratch: tuple | None = None) -> np.ndarray:
    """The next token of each sequence from its row of logits [S, >= vocab] (the first vocab
    columns; default all), in one kernel call (scratch: as sample_rows').

    Each row draws from its own sequence's random generator (one draw, none when greedy), so a
    sequence samples what it would alone."""
    S = len(seqs)
    opts = [s.opts for s in seqs]
    recent, offsets = [], [0]
    for s, o in zip(seqs, opts):
        if o.repeat_penalty != 1.0 and o.repeat_last_n:
            recent += s.history[-o.repeat_last_n:]
        offsets.append(len(recent))
    tokens = np.empty(S, np.int64)
    sample_rows(tokens, np.ascontiguousarray(logits, dtype=np.float32),
                np.array([o.temperature for o in opts], np.float64), np.array([o.top_k for o in opts], np.int64),
                np.array([o.top_p for o in opts], np.float64), np.array([o.min_p for o in opts], np.float64),
                np.array([o.repeat_penalty for o in opts], np.float64), np.array(recent, np.int64),
                np.array(offsets, np.int64),
                np.array([s.rng.random() if o.temperature != 0 else 0.0 for s, o in zip(seqs, opts)]), vocab,
                scratch)
    return tokens


WEIGHT_KINDS = INFERENCE_WEIGHTS


def weights_problem(kind: str) -> str | None:
    """Why these inference weights cannot be used here (None: they can)."""
    if kind not in WEIGHT_KINDS:
        return f"weights must be one of {', '.join(WEIGHT_KINDS)}, got {kind!r}"
    if kind == "bf16":
        from cllmd.kernels import blas
        if not blas.MKL_AVAILABLE:
            return ("bf16 weights need Intel MKL's bfloat16 gemm for prompts, and MKL was not found: "
                    "install the extra cllmd[mkl] (pip install 'cllmd[mkl]'), or use float32 or int8")
    return None


class InferenceWeights:
    """The weight matrices decoding multiplies by, as float32 (BLAS), int8 (cllmd.kernels.q8) or
    bfloat16 (cllmd.kernels.bf16linear; a prompt's rows through MKL's gemm_bf16).

    linear(name, x, prompts): out = x @ W[name] + b[name] for x [N, K]; prompts lists the row
    ranges (a, b) of prompts, which bf16 multiplies in a gemm each, the other rows in its
    row-exact kernel. head(x): the tied output layer, out = x @ wte^T. The int8 and bf16 forms
    convert every matrix once, here; a model's forms are kept on it (for_model), so requests
    on the same weights share them.
    """

    def __init__(self, model: Model, kind: str = "float32"):
        problem = weights_problem(kind)
        if problem:
            raise ValueError(problem)
        if kind != "float32" and model.dtype != np.float32:
            raise ValueError(f"{kind} weights need a float32 model, this one is {model.dtype}")
        self.model, self.kind = model, kind
        P = model.params
        names = [f"h.{l}.{n}" for l in range(model.cfg.n_layer)
                 for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        self.bias = {n: P[n + ".bias"] for n in names}
        if kind == "float32":
            self.matrices = {n: P[n + ".weight"] for n in names}
            self.head_t = P["wte"].T                                   # [C, V], a view
        elif kind == "int8":
            self.matrices = {n: Q8Weight(P[n + ".weight"]) for n in names}
            self.head_q = Q8Weight(P["wte"].T)
            self.head_bias = np.zeros(model.cfg.vocab_size, np.float32)  # the head has none
        else:
            self.matrices = {n: BF16Weight(P[n + ".weight"]) for n in names}
            self.bias = {n: self._padded(b, self.matrices[n].Mp) for n, b in self.bias.items()}
            self.head_b = BF16Weight(P["wte"].T)
            self.head_bias = np.zeros(self.head_b.Mp, np.float32)

    @staticmethod
    def _padded(b: np.ndarray, size: int) -> np.ndarray:
        out = np.zeros(size, np.float32)
        out[:b.size] = b
        return out

    @classmethod
    def for_model(cls, model: Model, kind: str = "float32") -> "InferenceWeights":
        cache = model.__dict__.setdefault("_inference_weights", {})
        if kind not in cache:
            cache[kind] = cls(model, kind)
        return cache[kind]

    @property
    def nbytes(self) -> int:
        """Bytes of the matrices decoding reads for every token (the head included)."""
        if self.kind == "float32":
            return sum(m.nbytes for m in self.matrices.values()) + self.model.params["wte"].nbytes
        head = self.head_q if self.kind == "int8" else self.head_b
        return sum(m.nbytes for m in self.matrices.values()) + head.nbytes

    def linear(self, name: str, x: np.ndarray, prompts=()) -> np.ndarray:
        w, b = self.matrices[name], self.bias[name]
        if self.kind == "int8":
            return q8_linear(x, w, b)
        if self.kind == "bf16":
            return self._bf16(x, w, b, prompts)
        out = x @ w
        out += b
        return out

    @property
    def head_width(self) -> int:
        """Columns of the buffer head() writes into: the vocabulary, padded for int8 and bf16."""
        if self.kind == "float32":
            return self.head_t.shape[1]
        return (self.head_q if self.kind == "int8" else self.head_b).Mp

    def head(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The logits [N, V]; out: a C-contiguous float32 [N, head_width] buffer to write into
        (the result is then a view of it), else a new array."""
        if self.kind == "float32":
            if out is None:
                return x @ self.head_t
            return np.matmul(x, self.head_t, out=out)
        if self.kind == "int8":
            return q8_linear(x, self.head_q, self.head_bias, out)
        return self._bf16(x, self.head_b, self.head_bias, (), out)

    @staticmethod
    def _bf16(x, w: BF16Weight, bias, prompts, out=None) -> np.ndarray:
        """Rows before the first prompt: the row-exact kernel; each prompt: MKL's gemm_bf16 on
        fresh arrays of its own shape (its values then do not depend on what else is in the pass).
        out: as for head()."""
        N = x.shape[0]
        full = np.empty((N, w.Mp), np.float32) if out is None else out
        few = min(a for a, _ in prompts) if prompts else N
        if few:
            bf16_linear(full[:few], np.ascontiguousarray(x[:few]), w, bias)
        for a, b in prompts:
            xb = np.empty((b - a, w.K), np.uint16)
            to_bf16(xb, x[a:b])
            part = np.empty((b - a, w.Mp), np.float32)
            for s in range(w.w.shape[0]):      # a gemm per column block [K, COLUMNS]
                gemm_bf16(False, False, 1.0, xb, w.w[s], 0.0, part[:, s * COLUMNS:(s + 1) * COLUMNS])
            part += bias
            full[a:b] = part
        if w.Mp == w.M:
            return full
        return full[:, :w.M] if out is not None else np.ascontiguousarray(full[:, :w.M])


class KVCache:
    """Keys and values of every layer for one sequence: [L, NH, capacity, hs] each.

    capacity defaults to the model's context; a sequence that will never need it all (prompt
    plus max_tokens shorter than the context) may take less: KV memory is the serving bound.
    """

    def __init__(self, model: Model, capacity: int | None = None):
        cfg = model.cfg
        hs = cfg.n_embd // cfg.n_head
        self.capacity = cfg.block_size if capacity is None else max(1, min(int(capacity), cfg.block_size))
        shape = (cfg.n_layer, cfg.n_head, self.capacity, hs)
        self.k = np.zeros(shape, dtype=model.dtype)
        self.v = np.zeros(shape, dtype=model.dtype)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_for(model: Model, capacity: int) -> int:
        cfg = model.cfg
        return 2 * cfg.n_layer * cfg.n_embd * min(capacity, cfg.block_size) * model.dtype.itemsize


class Decoder:
    """Runs the model over new positions of one or more sequences against their KV caches.

    forward() is one pass of matrix products for every new position of every sequence given:
    a prompt (many positions of one sequence), one decoding step of a batch (one position of
    each), or both mixed. Attention is per sequence: one call per layer for all sequences with
    few new rows, gemms per sequence for a prompt's many. advance() then samples every
    sequence's next token in one call. Each row's arithmetic is the same whatever else is in
    the pass (int8 exactly; float32 up to BLAS's blocking of a product).
    """

    def __init__(self, model: Model, weights: str = "float32"):
        self.model = model
        self.cfg = model.cfg
        self.weights = InferenceWeights.for_model(model, weights)
        self.cache: KVCache | None = None   # the single-sequence API's cache (prefill, step)
        self._lists, self._lists_key = None, None  # see _few_rows
        self._logits = None   # advance's logits buffer [rows, head_width], kept from step to step
        self._scratch = None  # ... and its sampling's work arrays (sampling_scratch)
        self.wpe = model.params["wpe"] if model.clock is None else model.params["wpe"] + model.clock

    def forward(self, caches: list[KVCache], tokens: list[list[int]], every: bool = False,
                reuse: bool = False) -> np.ndarray:
        """Appends tokens[i] to caches[i]; returns the logits after each one's last token [S, V]
        (every=True: after every token given, [N, V] in order, e.g. to measure perplexity).

        reuse=True: the logits are a view of a buffer this Decoder keeps, overwritten by its
        next such pass (advance() samples from them first). A step's fresh logits at GPT-2's
        vocabulary, 1.6 MB for 8 sequences, were a fresh mapping each step (cllmd/heap.py has
        malloc map blocks from 1 MiB), its pages faulted in again every step: ~800 page faults
        a step, 11-14% of the daemon's step of 8 (docs/benchmarks.md K)."""
        cfg, P, W = self.cfg, self.model.params, self.weights
        C, NH = cfg.n_embd, cfg.n_head
        hs = C // NH
        # a prompt's many rows sit after every sequence's few (decoding steps): bf16 products
        # take the few together in the row-exact kernel and each prompt in a gemm of its own
        lengths = [len(t) for t in tokens]
        order = range(len(tokens))
        if max(lengths, default=0) >= GEMM_ROWS:
            order = sorted(order, key=lambda i: lengths[i] >= GEMM_ROWS)
        spans: list = [None] * len(tokens)       # (first row, end row, first position) per sequence
        n = 0
        for i in order:
            cache, m = caches[i], lengths[i]
            if not m or cache.length + m > cache.capacity:
                raise ValueError(f"{m} new positions do not fit a cache holding {cache.length} "
                                 f"of {cache.capacity}")
            spans[i] = (n, n + m, cache.length)
            n += m
        if n == len(tokens):                     # one new position each (decoding steps)
            ids = np.array([t[0] for t in tokens], np.int64)
            pos = np.array([c.length for c in caches], np.int64)
        else:
            ids = np.fromiter((t for i in order for t in tokens[i]), np.int64, n)
            pos = np.concatenate([np.arange(spans[i][2], spans[i][2] + lengths[i]) for i in order])
        x = P["wte"][ids] + self.wpe[pos]                              # (N, C)
        # sequences with few new rows (decoding steps) attend in one call per layer; a prompt's
        # many rows go through gemms, one sequence at a time
        many = [i for i, m in enumerate(lengths) if kv_attention_uses_gemm(m)]
        few = self._few_rows(caches, spans, many)
        prompts = [(a, b) for a, b, _ in spans if b - a >= GEMM_ROWS]
        # the batch's attention on numba's threads only where the products run on them too
        # (int8, and this pass's largest product, c_fc, large enough: q8_linear's bound):
        # beside OpenBLAS's threads (float32) numba's OpenMP threads, spinning after each
        # region, halved float32's step of 8 (GPT-2 small, 2 threads: 121 -> 66 tokens/s)
        parallel = W.kind == "int8" and few is not None and batch_runs_parallel(
            few[2], C, threads_busy=n * C * 4 * C >= PARALLEL_MIN_MACS)
        ln = np.empty_like(x)
        mean, rstd = np.empty(n, x.dtype), np.empty(n, x.dtype)
        y = np.empty_like(x)
        for l in range(cfg.n_layer):
            p = f"h.{l}."
            layernorm_forward(ln, mean, rstd, x, P[p + "ln_1.weight"], P[p + "ln_1.bias"], LN_EPS)
            qkv = W.linear(p + "attn.c_attn", ln, prompts)                      # (N, 3C)
            if few is not None:
                kv_append_attention_batch(y, qkv, few[0], few[1], l, few[2], parallel)
            for i in many:
                a, b, first = spans[i]
                kv_append_attention(y[a:b], qkv[a:b], caches[i].k[l], caches[i].v[l], first)
            x += W.linear(p + "attn.c_proj", y, prompts)
            layernorm_forward(ln, mean, rstd, x, P[p + "ln_2.weight"], P[p + "ln_2.bias"], LN_EPS)
            fc = W.linear(p + "mlp.c_fc", ln, prompts)
            act = np.empty_like(fc)
            gelu_forward(act, fc)   # not in place: the alias check LLVM's vectorizer adds fails, ~8x slower
            x += W.linear(p + "mlp.c_proj", act, prompts)
        last = (np.concatenate([np.arange(a, b) for a, b, _ in spans]) if every
                else np.array([b - 1 for _, b, _ in spans]))
        xl = np.ascontiguousarray(x[last])
        lnl = np.empty_like(xl)
        layernorm_forward(lnl, mean[:len(last)], rstd[:len(last)], xl, P["ln_f.weight"], P["ln_f.bias"], LN_EPS)
        for cache, (a, b, _) in zip(caches, spans):
            cache.length += b - a
        out = None
        if reuse:
            rows = len(last)
            if self._logits is None or self._logits.shape[0] < rows:
                self._logits = np.empty((rows, W.head_width), np.float32)
            out = self._logits[:rows]
        return W.head(lnl, out)                                        # tied head (S, V)

    def _few_rows(self, caches, spans, many):
        """kv_append_attention_batch's arguments for the spans not in many (None if none): typed
        lists of their caches' arrays, kept while the same caches come (a batch changes rarely),
        and their spans."""
        few = [i for i in range(len(spans)) if i not in many]
        if not few:
            return None
        key = [caches[i] for i in few]   # the caches themselves: an id could be reused
        if self._lists_key is None or len(key) != len(self._lists_key) or \
                any(a is not b for a, b in zip(key, self._lists_key)):
            ks, vs = List(), List()
            for i in few:
                ks.append(caches[i].k)
                vs.append(caches[i].v)
            self._lists, self._lists_key = (ks, vs), key
        return self._lists + (np.array([spans[i] for i in few], np.int64),)

    def advance(self, seqs: list["Sequence"]) -> list[list[str]]:
        """One pass for every sequence given (none done): each one's new text pieces."""
        logits = self.forward([s.cache for s in seqs], [s.feed() for s in seqs], reuse=True)
        out: list[list[str]] = [s.ending() for s in seqs]   # cancelled or out of tokens: ended now
        live = [i for i, pieces in enumerate(out) if pieces is None]
        if live:
            vocab = seqs[live[0]].vocab or logits.shape[-1]
            # the buffer itself (C-contiguous, head_width columns) while every row samples, a
            # copy of the live rows when some end
            rows = self._logits[:len(seqs)]
            if self._scratch is None or self._scratch[0].shape[0] < len(live) or self._scratch[0].shape[1] < vocab:
                self._scratch = sampling_scratch(self._logits.shape[0], vocab)
            tokens = sample_batch(rows if len(live) == len(seqs) else rows[live], [seqs[i] for i in live], vocab,
                                  self._scratch)
            for i, token in zip(live, tokens):
                out[i] = seqs[i].take(int(token))
        return out

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Resets the cache to tokens (at most block_size of them); returns the last logits [V]."""
        if self.cache is None:
            self.cache = KVCache(self.model)
        self.cache.length = 0
        return self.forward([self.cache], [list(tokens)])[0]

    def step(self, token: int) -> np.ndarray:
        """Appends one token at the next position; returns its logits [V]."""
        return self.forward([self.cache], [[int(token)]])[0]


class StopMatcher:
    """Holds back text that could still become a stop string; never emits a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[:min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class GenerationStats:
    tokens_prompt: int = 0
    tokens_generated: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0          # the prompt's pass
    time_to_first_token: float = 0.0      # from the start to the first token sampled
    prompt_tokens_per_second: float = 0.0
    tokens_per_second: float = 0.0        # generated tokens / the time after the prompt's pass
    stop_reason: str = ""         # max_tokens | eot | stop | cancelled
    token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("token_ids")
        return d


def prompt_ids(model: Model, prompt) -> list[int]:
    """The prompt as token ids (text through the model's tokenizer); never empty."""
    tok = model.tokenizer
    if isinstance(prompt, str):
        if tok is None:
            raise ValueError("this model has no tokenizer: pass token ids")
        ids = [int(i) for i in tok.encode(prompt)]
    else:
        ids = [int(i) for i in prompt]
        if any(not 0 <= i < model.cfg.vocab_size for i in ids):
            raise ValueError(f"prompt token ids must lie in [0, {model.cfg.vocab_size})")
    if not ids:
        if tok is None or tok.eot_id is None:
            raise ValueError("empty prompt and no end-of-text token to start from")
        ids = [tok.eot_id]  # an empty prompt starts a fresh document
    return ids


class Sequence:
    """One request's decoding state, advanced one pass at a time by whoever runs the model.

    feed() gives the positions to run next (the prompt's context first, then one token, or the
    last half of the context again when the window slides); after the pass, ending() says
    whether it ends before sampling, and take(token) appends the token sampled from its logits
    (Decoder.advance samples a whole batch in one call) and returns the text pieces that became
    safe to emit. A Generation runs one Sequence alone; the daemon's batcher runs many in one
    pass (cllmd.batching).
    """

    def __init__(self, model: Model, prompt, opts: SamplingOptions | None = None,
                 cancel: threading.Event | None = None):
        self.model = model
        self.opts = opts or SamplingOptions()
        self.cancel_event = cancel or threading.Event()
        ids = prompt_ids(model, prompt)
        tok = model.tokenizer
        self.eot_id = tok.eot_id if tok is not None else None
        self.block = model.cfg.block_size
        self.history = list(ids)
        self.cache = KVCache(model, min(self.block, len(ids) + self.opts.max_tokens))
        self.stats = GenerationStats(tokens_prompt=len(ids))
        self.rng = np.random.default_rng(self.opts.seed)
        self.table = tok.token_bytes_table() if tok is not None else None
        # a model's vocabulary may be padded past its tokenizer's: those ids are never sampled
        self.vocab = len(self.table) if self.table is not None else 0
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.matcher = StopMatcher(self.opts.stop)
        self.done = False
        self.abandoned = False     # its reader went away: ends like a cancel
        self.weights = "float32"   # what the batcher decodes it with (set when it joins)
        self._next = ids[-self.block:]
        self._t0 = time.perf_counter()

    def feed(self) -> list[int]:
        """The token ids of the next pass; the cache is reset first when they restart it."""
        if self.cache.length + len(self._next) > self.cache.capacity or self.cache.length == 0:
            self.cache.length = 0
        return self._next

    def ending(self) -> list[str] | None:
        """After a pass: the last pieces if the sequence ends before sampling (cancelled, or no
        tokens left), else None."""
        stats = self.stats
        if not stats.prefill_seconds:
            stats.prefill_seconds = time.perf_counter() - self._t0
            stats.prompt_tokens_per_second = len(self._next) / stats.prefill_seconds
        if self.cancel_event.is_set() or self.abandoned:
            return self.finish("cancelled")
        if stats.tokens_generated >= self.opts.max_tokens:
            return self.finish("max_tokens")
        return None

    def take(self, token: int) -> list[str]:
        """Appends the sampled token; returns the pieces that became safe to emit."""
        opts, stats = self.opts, self.stats
        if not stats.time_to_first_token:
            stats.time_to_first_token = time.perf_counter() - self._t0
        if opts.stop_at_eot and token == self.eot_id:
            return self.finish("eot")
        self.history.append(token)
        stats.token_ids.append(token)
        stats.tokens_generated += 1
        pieces = []
        if self.table is not None:
            piece, stopped = self.matcher.feed(self.utf8.decode(self.table[token]))
            if piece:
                pieces.append(piece)
            if stopped:
                return pieces + self.finish("stop")
        if stats.tokens_generated >= opts.max_tokens:
            return pieces + self.finish("max_tokens")
        if self.cache.length == self.block:
            self._next = self.history[-(self.block // 2):]  # context full: slide, keeping the last half
        else:
            self._next = [token]
        return pieces

    def finish(self, reason: str) -> list[str]:
        self.done = True
        stats = self.stats
        stats.stop_reason = reason
        stats.seconds = time.perf_counter() - self._t0
        decode_seconds = stats.seconds - stats.prefill_seconds
        stats.tokens_per_second = stats.tokens_generated / decode_seconds if decode_seconds > 0 else 0.0
        tail = ""
        if reason != "stop" and self.table is not None:
            tail = self.matcher.flush() + self.utf8.decode(b"", final=True)
        return [tail] if tail else []


class Generation:
    """An iterator of text pieces (never splitting a UTF-8 character); .stats when it ends.

    weights: "float32", "int8" (cllmd.kernels.q8) or "bf16" (cllmd.kernels.bf16linear; MKL needed);
    converted once per model object.
    """

    def __init__(self, model: Model, prompt, opts: SamplingOptions | None = None,
                 cancel: threading.Event | None = None, weights: str = "float32"):
        self.model = model
        self.decoder = Decoder(model, weights)
        self.seq = Sequence(model, prompt, opts, cancel)
        self.opts, self.stats, self.cancel_event = self.seq.opts, self.seq.stats, self.seq.cancel_event
        self._gen = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def cancel(self) -> None:
        self.cancel_event.set()

    def text(self) -> str:
        return "".join(self)

    def _run(self):
        seq = self.seq
        try:
            while not seq.done:
                yield from self.decoder.advance([seq])[0]
        finally:
            if not seq.done:  # closed early by the consumer
                seq.finish("cancelled")


def generate(model: Model, prompt, cancel: threading.Event | None = None, weights: str = "float32",
             **options) -> Generation:
    """Convenience: Generation(model, prompt, SamplingOptions(**options), cancel, weights)."""
    return Generation(model, prompt, SamplingOptions(**options), cancel, weights)
