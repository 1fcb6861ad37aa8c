"""Text generation with a KV cache: sampling options, stop strings and UTF-8 safe streaming.

Each new token costs one position's work: the prompt is run once through the full forward pass
(prefill) and its keys and values are kept; every further token attends to the cache. When the
context is full, the window slides: the last half is kept and prefilled again.
"""
from __future__ import annotations

import codecs
import math
import threading
import time
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from cllm.catalogue import SAMPLING, check_sampling
from cllmd.kernels.gelu import gelu_forward
from cllmd.kernels.layernorm import layernorm_forward
from cllmd.model import LN_EPS, Model, Workspace


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
    def from_args(cls, args: dict) -> "SamplingOptions":
        """From generate's validated arguments (or any map holding the catalogue's names)."""
        return cls(**{k: (tuple(v or ()) if k == "stop" else v) for k, v in args.items() if k in SAMPLING})


def sample_next(logits: np.ndarray, opts: SamplingOptions, rng: np.random.Generator,
                recent: list[int]) -> int:
    """Picks the next token id from one position's logits [V]."""
    logits = logits.astype(np.float64)
    if opts.repeat_penalty != 1.0 and recent:
        ids = np.unique(np.asarray(recent[-opts.repeat_last_n:] if opts.repeat_last_n else [], dtype=np.int64))
        if ids.size:
            vals = logits[ids]
            logits[ids] = np.where(vals > 0, vals / opts.repeat_penalty, vals * opts.repeat_penalty)
    if opts.temperature == 0:
        return int(np.argmax(logits))
    logits /= opts.temperature
    if opts.top_k and opts.top_k < logits.size:
        kth = np.partition(logits, -opts.top_k)[-opts.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if opts.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = int(np.searchsorted(cumulative, opts.top_p)) + 1  # smallest prefix reaching top_p
        probs[order[keep:]] = 0.0
    if opts.min_p > 0.0:
        probs[probs < opts.min_p * probs.max()] = 0.0
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


class KVCache:
    """Keys and values of every layer for one sequence: [L, NH, block_size, hs] each."""

    def __init__(self, model: Model):
        cfg = model.cfg
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, cfg.n_head, cfg.block_size, hs)
        self.k = np.zeros(shape, dtype=model.dtype)
        self.v = np.zeros(shape, dtype=model.dtype)
        self.length = 0


class Decoder:
    """Runs the model position by position against a KV cache (B = 1)."""

    def __init__(self, model: Model):
        self.model = model
        self.cfg = model.cfg
        self.cache = KVCache(model)
        C = self.cfg.n_embd
        dt = model.dtype
        self._ln = np.empty((1, C), dt)
        self._mean = np.empty(1, dt)
        self._rstd = np.empty(1, dt)
        self._fc = np.empty((1, 4 * C), dt)
        self._fc_gelu = np.empty((1, 4 * C), dt)
        self.wpe = model.params["wpe"] if model.clock is None else model.params["wpe"] + model.clock

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Resets the cache to tokens (at most block_size of them); returns the last logits [V]."""
        cfg, m = self.cfg, self.model
        T = len(tokens)
        ws = Workspace(cfg, 1, T, m.dtype)
        logits = m.forward_into(ws, np.asarray([tokens], dtype=np.int64))
        C, NH = cfg.n_embd, cfg.n_head
        hs = C // NH
        for l in range(cfg.n_layer):
            qkv = ws.qkv[l, 0]                                         # (T, 3C)
            self.cache.k[l, :, :T] = qkv[:, C:2 * C].reshape(T, NH, hs).transpose(1, 0, 2)
            self.cache.v[l, :, :T] = qkv[:, 2 * C:].reshape(T, NH, hs).transpose(1, 0, 2)
        self.cache.length = T
        return logits[T - 1].copy()

    def step(self, token: int) -> np.ndarray:
        """Appends one token at the next position; returns its logits [V]."""
        cfg, P = self.cfg, self.model.params
        pos = self.cache.length
        C, NH = cfg.n_embd, cfg.n_head
        hs = C // NH
        scale = 1.0 / math.sqrt(hs)
        x = (P["wte"][token] + self.wpe[pos])[None, :]                 # (1, C)
        for l in range(cfg.n_layer):
            p = f"h.{l}."
            layernorm_forward(self._ln, self._mean, self._rstd, x, P[p + "ln_1.weight"], P[p + "ln_1.bias"], LN_EPS)
            qkv = self._ln[0] @ P[p + "attn.c_attn.weight"] + P[p + "attn.c_attn.bias"]   # (3C,)
            q = qkv[:C].reshape(NH, hs)
            self.cache.k[l, :, pos] = qkv[C:2 * C].reshape(NH, hs)
            self.cache.v[l, :, pos] = qkv[2 * C:].reshape(NH, hs)
            keys = self.cache.k[l, :, :pos + 1]                        # (NH, n, hs)
            values = self.cache.v[l, :, :pos + 1]
            scores = np.matmul(keys, q[:, :, None])[:, :, 0] * scale   # (NH, n)
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
            y = np.matmul(scores[:, None, :], values)[:, 0, :]         # (NH, hs)
            x = x + (y.reshape(1, C) @ P[p + "attn.c_proj.weight"] + P[p + "attn.c_proj.bias"])
            layernorm_forward(self._ln, self._mean, self._rstd, x, P[p + "ln_2.weight"], P[p + "ln_2.bias"], LN_EPS)
            np.matmul(self._ln, P[p + "mlp.c_fc.weight"], out=self._fc)
            self._fc += P[p + "mlp.c_fc.bias"]
            gelu_forward(self._fc_gelu, self._fc)
            x = x + (self._fc_gelu @ P[p + "mlp.c_proj.weight"] + P[p + "mlp.c_proj.bias"])
        layernorm_forward(self._ln, self._mean, self._rstd, x, P["ln_f.weight"], P["ln_f.bias"], LN_EPS)
        self.cache.length = pos + 1
        return P["wte"] @ self._ln[0]                                  # tied head (V,)


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
    prefill_seconds: float = 0.0
    tokens_per_second: float = 0.0
    stop_reason: str = ""         # max_tokens | eot | stop | cancelled
    token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("token_ids")
        return d


class Generation:
    """An iterator of text pieces (never splitting a UTF-8 character); .stats when it ends."""

    def __init__(self, model: Model, prompt, opts: SamplingOptions | None = None,
                 cancel: threading.Event | None = None):
        self.model = model
        self.opts = opts or SamplingOptions()
        self.cancel_event = cancel or threading.Event()
        tok = model.tokenizer
        if isinstance(prompt, str):
            if tok is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            ids = [int(i) for i in tok.encode(prompt)]
        else:
            ids = [int(i) for i in prompt]
            if any(not 0 <= i < model.cfg.vocab_size for i in ids):
                raise ValueError(f"prompt token ids must lie in [0, {model.cfg.vocab_size})")
        self.eot_id = tok.eot_id if tok is not None else None
        if not ids:
            if self.eot_id is None:
                raise ValueError("empty prompt and no end-of-text token to start from")
            ids = [self.eot_id]  # an empty prompt starts a fresh document
        self.stats = GenerationStats(tokens_prompt=len(ids))
        self._gen = self._run(ids)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def cancel(self) -> None:
        self.cancel_event.set()

    def text(self) -> str:
        return "".join(self)

    def _run(self, ids: list[int]):
        opts, stats, model = self.opts, self.stats, self.model
        block = model.cfg.block_size
        rng = np.random.default_rng(opts.seed)
        decoder = Decoder(model)
        table = model.tokenizer.token_bytes_table() if model.tokenizer is not None else None
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        matcher = StopMatcher(opts.stop)
        context = ids[-block:]
        t0 = time.perf_counter()
        logits = decoder.prefill(context)
        stats.prefill_seconds = time.perf_counter() - t0
        history = list(ids)
        reason = "max_tokens"
        try:
            for _ in range(opts.max_tokens):
                if self.cancel_event.is_set():
                    reason = "cancelled"
                    break
                token = sample_next(logits, opts, rng, history)
                if opts.stop_at_eot and token == self.eot_id:
                    reason = "eot"
                    break
                history.append(token)
                stats.token_ids.append(token)
                stats.tokens_generated += 1
                if table is not None:
                    piece, stopped = matcher.feed(utf8.decode(table[token]))
                    if piece:
                        yield piece
                    if stopped:
                        reason = "stop"
                        break
                if decoder.cache.length == block:
                    # context full: slide the window, keeping the last half (prefilled again)
                    context = history[-(block // 2):]
                    logits = decoder.prefill(context)
                else:
                    logits = decoder.step(token)
            if reason != "stop" and table is not None:
                tail = matcher.flush() + utf8.decode(b"", final=True)
                if tail:
                    yield tail
        finally:
            stats.stop_reason = reason
            stats.seconds = time.perf_counter() - t0
            decode_seconds = stats.seconds - stats.prefill_seconds
            stats.tokens_per_second = stats.tokens_generated / decode_seconds if decode_seconds > 0 else 0.0


def generate(model: Model, prompt, cancel: threading.Event | None = None, **options) -> Generation:
    """Convenience: Generation(model, prompt, SamplingOptions(**options))."""
    return Generation(model, prompt, SamplingOptions(**options), cancel)
