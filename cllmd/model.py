"""The CLLM: a GPT-2 style decoder with explicit, layer-by-layer forward and backward passes.

Parameters live in one flat buffer with named views in GPT-2's checkpoint layout; activations
for a (B, T) live in a Workspace allocated once and reused. Matmuls go to BLAS through numpy,
element-wise and reduction work to the numba kernels in cllmd.kernels.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cllmd.kernels.attention import attention_backward, attention_forward
from cllmd.kernels.crossentropy import crossentropy_backward, crossentropy_forward
from cllmd.kernels.embedding import embedding_backward, embedding_forward
from cllmd.kernels.gelu import gelu_backward, gelu_forward
from cllmd.kernels.layernorm import layernorm_backward, layernorm_forward

LN_EPS = 1e-5
INIT_STD = 0.02


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 257      # bytes tokenizer: 256 bytes + end-of-text
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64       # context length; also the number of learned positions
    init: str = "normal"       # "normal" (GPT-2) or "lattice" (Vogel-spiral token embeddings)
    clock_positions: bool = False  # add fixed 12-periodic angle features to the positions

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.init not in ("normal", "lattice"):
            raise ValueError(f"model config: init must be 'normal' or 'lattice', got {self.init!r}")
        if not isinstance(self.clock_positions, bool):
            raise ValueError(f"model config: clock_positions must be true or false, got {self.clock_positions!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}")
        return cls(**d)


def param_table(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The ordered parameter names and shapes; buffers, gradients and AdamW moments follow it."""
    V, C, T = cfg.vocab_size, cfg.n_embd, cfg.block_size
    table = [("wte", (V, C)), ("wpe", (T, C))]
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        table += [
            (p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)),
            (p + "attn.c_attn.weight", (C, 3 * C)), (p + "attn.c_attn.bias", (3 * C,)),
            (p + "attn.c_proj.weight", (C, C)), (p + "attn.c_proj.bias", (C,)),
            (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
            (p + "mlp.c_fc.weight", (C, 4 * C)), (p + "mlp.c_fc.bias", (4 * C,)),
            (p + "mlp.c_proj.weight", (4 * C, C)), (p + "mlp.c_proj.bias", (C,)),
        ]
    table += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return table


def flat_views(flat: np.ndarray, table) -> dict[str, np.ndarray]:
    """Named views into one flat buffer, in table order."""
    views, offset = {}, 0
    for name, shape in table:
        n = math.prod(shape)
        views[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    return views


def num_params(cfg: ModelConfig) -> int:
    return sum(math.prod(shape) for _, shape in param_table(cfg))


def _first_primes(n: int) -> list[int]:
    primes, candidate = [], 2
    while len(primes) < n:
        if all(candidate % p for p in primes if p * p <= candidate):
            primes.append(candidate)
        candidate += 1
    return primes


def lattice_embedding(vocab_size: int, n_embd: int, std: float = INIT_STD) -> np.ndarray:
    """Deterministic token embeddings from prime / golden-angle (Vogel spiral) Fourier features.

    Token v sits on a Vogel spiral: radius r_v = sqrt((v + 0.5) / V), angle phi_v = v * g with the
    golden angle g = pi (3 - sqrt 5). Channel pair k (columns 2k, 2k+1) takes the k-th prime p_k
    as a frequency: E[v, 2k] = r_v cos(p_k phi_v), E[v, 2k+1] = r_v sin(p_k phi_v) (an odd last
    column takes the cosine). The matrix is then centred and rescaled to standard deviation std.
    """
    v = np.arange(vocab_size, dtype=np.float64)
    radius = np.sqrt((v + 0.5) / vocab_size)[:, None]
    phi = (v * math.pi * (3.0 - math.sqrt(5.0)))[:, None]
    primes = np.array(_first_primes((n_embd + 1) // 2), dtype=np.float64)[None, :]
    features = np.empty((vocab_size, 2 * primes.shape[1]))
    features[:, 0::2] = radius * np.cos(primes * phi)
    features[:, 1::2] = radius * np.sin(primes * phi)
    features = features[:, :n_embd]
    features -= features.mean()
    return features * (std / features.std())


def clock_features(block_size: int, n_embd: int, scale: float = INIT_STD) -> np.ndarray:
    """Fixed 12-periodic "clock" position features, added to the learned position embedding.

    Position t is an hour on a 12-hour clock, angle theta_t = 2 pi t / 12. Channel pair k uses the
    harmonic m_k = (k mod 6) + 1 (the six distinct frequencies of a 12-periodic signal):
    F[t, 2k] = scale cos(m_k theta_t), F[t, 2k+1] = scale sin(m_k theta_t).
    """
    t = np.arange(block_size, dtype=np.float64)[:, None]
    harmonic = (np.arange((n_embd + 1) // 2) % 6 + 1)[None, :]
    angle = 2.0 * math.pi * t * harmonic / 12.0
    features = np.empty((block_size, 2 * harmonic.shape[1]))
    features[:, 0::2] = np.cos(angle)
    features[:, 1::2] = np.sin(angle)
    return scale * features[:, :n_embd]


class Workspace:
    """Activations and gradients for one (B, T): allocated once, reused every step.

    Each trainer sphere owns one, so spheres never share writable memory.
    """

    def __init__(self, cfg: ModelConfig, B: int, T: int, dtype=np.float32, grad_flat: np.ndarray | None = None):
        C, V, NH, L = cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.n_layer
        N = B * T
        self.B, self.T, self.dtype = B, T, np.dtype(dtype)
        e = lambda *shape: np.empty(shape, dtype=dtype)  # noqa: E731
        self.encoded = e(B, T, C)
        self.ln1, self.ln1_mean, self.ln1_rstd = e(L, N, C), e(L, N), e(L, N)
        self.qkv = e(L, B, T, 3 * C)
        self.att = e(L, B, NH, T, T)
        self.atty = e(L, B, T, C)
        self.residual2 = e(L, N, C)
        self.ln2, self.ln2_mean, self.ln2_rstd = e(L, N, C), e(L, N), e(L, N)
        self.fch, self.fch_gelu = e(L, N, 4 * C), e(L, N, 4 * C)
        self.residual3 = e(L, N, C)
        self.lnf, self.lnf_mean, self.lnf_rstd = e(N, C), e(N), e(N)
        self.logits = e(N, V)  # becomes probabilities, then dlogits, in place
        self.losses = e(N)
        # backward scratch
        self.dresidual, self.dtmp = e(N, C), e(N, C)
        self.dqkv = e(B, T, 3 * C)
        self.dfch, self.dfch_gelu = e(N, 4 * C), e(N, 4 * C)
        self.table = param_table(cfg)
        self.grad_flat = np.zeros(num_params(cfg), dtype=dtype) if grad_flat is None else grad_flat
        self.grads = flat_views(self.grad_flat, self.table)
        # the gradients that kernels accumulate into (+=); all others are written whole by matmuls
        self.accumulated = [g for name, g in self.grads.items() if ".ln_" in name or name.startswith("ln_")
                            or name == "wpe"]


class Model:
    """Parameters (GPT-2 names and shapes) plus forward, backward, save and load."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, dtype=np.float32, tokenizer=None,
                 metadata: dict | None = None, _flat: np.ndarray | None = None):
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        self.tokenizer = tokenizer
        self.metadata = dict(metadata or {})
        self.table = param_table(cfg)
        if _flat is None:
            self.flat = np.zeros(num_params(cfg), dtype=self.dtype)
            self.params = flat_views(self.flat, self.table)
            self._init(seed)
        else:
            self.flat = _flat
            self.params = flat_views(self.flat, self.table)
        self.clock = clock_features(cfg.block_size, cfg.n_embd).astype(self.dtype) if cfg.clock_positions else None
        self._workspace: Workspace | None = None

    def _init(self, seed: int) -> None:
        # GPT-2 init: N(0, 0.02); residual projections scaled by 1/sqrt(2 n_layer) because each
        # block adds two of them to the residual stream; biases 0; LayerNorm weights 1.
        rng = np.random.default_rng(seed)
        proj_std = INIT_STD / math.sqrt(2 * self.cfg.n_layer)
        for name, shape in self.table:
            p = self.params[name]
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                p[...] = 1.0
            elif name.endswith(".bias"):
                p[...] = 0.0
            elif name == "wte" and self.cfg.init == "lattice":
                p[...] = lattice_embedding(self.cfg.vocab_size, self.cfg.n_embd)
            else:
                std = proj_std if name.endswith("c_proj.weight") else INIT_STD
                p[...] = rng.normal(0.0, std, size=shape)

    @property
    def num_params(self) -> int:
        return self.flat.size

    def workspace(self, B: int, T: int) -> Workspace:
        """The model's own cached workspace for (B, T) (single-threaded use)."""
        ws = self._workspace
        if ws is None or (ws.B, ws.T) != (B, T) or ws.dtype != self.dtype:
            ws = self._workspace = Workspace(self.cfg, B, T, self.dtype)
        return ws

    def _check_idx(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"idx must be a 2-D array [B, T], got shape {idx.shape}")
        if idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {self.cfg.block_size}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{idx.min()}, {idx.max()}]")
        return np.ascontiguousarray(idx, dtype=np.int64)

    # ---- forward -----------------------------------------------------------------------------

    def forward_into(self, ws: Workspace, idx: np.ndarray) -> np.ndarray:
        """Forward pass saving every activation in ws; returns logits [B*T, V] (a view of ws)."""
        cfg, P = self.cfg, self.params
        B, T = idx.shape
        N, C, NH = B * T, cfg.n_embd, cfg.n_head
        wpe = P["wpe"] if self.clock is None else P["wpe"] + self.clock
        embedding_forward(ws.encoded, idx, P["wte"], wpe, 0)
        x = ws.encoded.reshape(N, C)
        for l in range(cfg.n_layer):
            p = f"h.{l}."
            ln1, qkv, atty = ws.ln1[l], ws.qkv[l], ws.atty[l]
            layernorm_forward(ln1, ws.ln1_mean[l], ws.ln1_rstd[l], x, P[p + "ln_1.weight"], P[p + "ln_1.bias"], LN_EPS)
            np.matmul(ln1, P[p + "attn.c_attn.weight"], out=qkv.reshape(N, 3 * C))
            qkv += P[p + "attn.c_attn.bias"]
            attention_forward(atty, ws.att[l], qkv, NH)                    # (B, T, C)
            res2 = ws.residual2[l]
            np.matmul(atty.reshape(N, C), P[p + "attn.c_proj.weight"], out=res2)
            res2 += P[p + "attn.c_proj.bias"]
            res2 += x                                                      # x + attn(ln_1(x))
            ln2, fch, fch_gelu = ws.ln2[l], ws.fch[l], ws.fch_gelu[l]
            layernorm_forward(ln2, ws.ln2_mean[l], ws.ln2_rstd[l], res2, P[p + "ln_2.weight"], P[p + "ln_2.bias"], LN_EPS)
            np.matmul(ln2, P[p + "mlp.c_fc.weight"], out=fch)              # (N, 4C)
            fch += P[p + "mlp.c_fc.bias"]
            gelu_forward(fch_gelu, fch)
            res3 = ws.residual3[l]
            np.matmul(fch_gelu, P[p + "mlp.c_proj.weight"], out=res3)
            res3 += P[p + "mlp.c_proj.bias"]
            res3 += res2                                                   # x + mlp(ln_2(x))
            x = res3
        layernorm_forward(ws.lnf, ws.lnf_mean, ws.lnf_rstd, x, P["ln_f.weight"], P["ln_f.bias"], LN_EPS)
        np.matmul(ws.lnf, P["wte"].T, out=ws.logits)                       # tied output head (N, V)
        return ws.logits

    def forward(self, idx) -> np.ndarray:
        """Logits [B, T, V] (a fresh array) for token ids idx [B, T]."""
        idx = self._check_idx(idx)
        B, T = idx.shape
        ws = self.workspace(B, T)
        return self.forward_into(ws, idx).reshape(B, T, -1).copy()

    # ---- forward + backward ------------------------------------------------------------------

    def forward_loss(self, ws: Workspace, idx: np.ndarray, targets: np.ndarray,
                     mask: np.ndarray | None = None) -> tuple[float, float]:
        """Forward only: (mean cross-entropy over counted positions, count); ws.losses per position."""
        N = idx.size
        logits = self.forward_into(ws, idx)
        crossentropy_forward(logits, ws.losses, logits, targets.reshape(N))  # logits -> probs in place
        if mask is None:
            return float(ws.losses.sum(dtype=np.float64)) / N, float(N)
        weights = mask.reshape(N)
        count = float(weights.sum(dtype=np.float64))
        if count == 0.0:
            return 0.0, 0.0
        return float((ws.losses * weights).sum(dtype=np.float64)) / count, count

    def forward_backward(self, ws: Workspace, idx: np.ndarray, targets: np.ndarray,
                         mask: np.ndarray | None = None, normalizer: float | None = None) -> tuple[float, float]:
        """Loss and gradients of one batch into ws.grads.

        The loss is the mean cross-entropy over the positions where mask is 1 (all of them when
        mask is None); masked positions contribute neither loss nor gradient. ws.grads receives
        d(sum of counted losses / normalizer)/d(params); normalizer defaults to the count, i.e.
        the gradient of the mean (the trainer passes 1 and divides once after its reduction).
        Returns (mean loss, number of counted positions).
        """
        cfg, P, G = self.cfg, self.params, ws.grads
        B, T = idx.shape
        N, C, NH = B * T, cfg.n_embd, cfg.n_head
        loss, count = self.forward_loss(ws, idx, targets, mask)
        targets = targets.reshape(N)
        logits = ws.logits
        if count == 0.0:
            ws.grad_flat[:] = 0.0
            return 0.0, 0.0
        scale = 1.0 / (count if normalizer is None else normalizer)
        if mask is None:
            dlosses = np.full(N, scale, dtype=ws.dtype)
        else:
            dlosses = mask.reshape(N).astype(ws.dtype) * ws.dtype.type(scale)

        for g in ws.accumulated:
            g[...] = 0.0
        dlogits = logits
        crossentropy_backward(dlogits, logits, targets, dlosses)           # probs -> dlogits in place
        # logits = lnf @ wte.T: weight gradient written once here, embedding adds to it below
        np.matmul(dlogits.T, ws.lnf, out=G["wte"])
        dlnf = ws.dtmp
        np.matmul(dlogits, P["wte"], out=dlnf)
        dx = ws.dresidual
        dx[:] = 0.0
        x_last = ws.residual3[cfg.n_layer - 1] if cfg.n_layer else ws.encoded.reshape(N, C)
        layernorm_backward(dx, G["ln_f.weight"], G["ln_f.bias"], dlnf, x_last, P["ln_f.weight"], ws.lnf_mean, ws.lnf_rstd)
        for l in reversed(range(cfg.n_layer)):
            p = f"h.{l}."
            x_in = ws.residual3[l - 1] if l else ws.encoded.reshape(N, C)
            # res3 = res2 + fch_gelu @ W_proj + b: dx flows to res2 unchanged (residual)
            np.matmul(ws.fch_gelu[l].T, dx, out=G[p + "mlp.c_proj.weight"])
            np.sum(dx, axis=0, out=G[p + "mlp.c_proj.bias"])
            np.matmul(dx, P[p + "mlp.c_proj.weight"].T, out=ws.dfch_gelu)
            dfch = ws.dfch
            gelu_backward(dfch, ws.fch[l], ws.dfch_gelu)  # separate buffers: aliasing would stop SIMD
            np.matmul(ws.ln2[l].T, dfch, out=G[p + "mlp.c_fc.weight"])
            np.sum(dfch, axis=0, out=G[p + "mlp.c_fc.bias"])
            dln2 = ws.dtmp
            np.matmul(dfch, P[p + "mlp.c_fc.weight"].T, out=dln2)
            layernorm_backward(dx, G[p + "ln_2.weight"], G[p + "ln_2.bias"], dln2, ws.residual2[l],
                               P[p + "ln_2.weight"], ws.ln2_mean[l], ws.ln2_rstd[l])
            # res2 = x + atty @ W_o + b_o: dx (now d res2) flows to x unchanged
            np.matmul(ws.atty[l].reshape(N, C).T, dx, out=G[p + "attn.c_proj.weight"])
            np.sum(dx, axis=0, out=G[p + "attn.c_proj.bias"])
            datty = ws.dtmp
            np.matmul(dx, P[p + "attn.c_proj.weight"].T, out=datty)
            dqkv = ws.dqkv
            dqkv[:] = 0.0
            attention_backward(dqkv, datty.reshape(B, T, C), ws.qkv[l], ws.att[l], NH)
            dqkv2 = dqkv.reshape(N, 3 * C)
            np.matmul(ws.ln1[l].T, dqkv2, out=G[p + "attn.c_attn.weight"])
            np.sum(dqkv2, axis=0, out=G[p + "attn.c_attn.bias"])
            dln1 = ws.dtmp
            np.matmul(dqkv2, P[p + "attn.c_attn.weight"].T, out=dln1)
            layernorm_backward(dx, G[p + "ln_1.weight"], G[p + "ln_1.bias"], dln1, x_in,
                               P[p + "ln_1.weight"], ws.ln1_mean[l], ws.ln1_rstd[l])
        embedding_backward(G["wte"], G["wpe"], dx.reshape(B, T, C), idx, 0)
        return loss, count

    def loss_and_grads(self, idx, targets, mask=None) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy and its gradients (fresh arrays, same keys as params)."""
        idx = self._check_idx(idx)
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {targets.shape} differs from idx shape {idx.shape}")
        if targets.min() < 0 or targets.max() >= self.cfg.vocab_size:
            raise ValueError(f"target ids must lie in [0, {self.cfg.vocab_size})")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != idx.shape:
                raise ValueError(f"mask shape {mask.shape} differs from idx shape {idx.shape}")
        B, T = idx.shape
        ws = self.workspace(B, T)
        loss, _ = self.forward_backward(ws, idx, targets, mask)
        return loss, {name: g.copy() for name, g in ws.grads.items()}

    # ---- persistence -------------------------------------------------------------------------

    def save(self, path, metadata: dict | None = None) -> None:
        """Write a .cllm file atomically: config, tokenizer, metadata and every tensor."""
        from cllmd.modelfile import write_model_file

        meta = dict(self.metadata)
        meta.update(metadata or {})
        tok = self.tokenizer.to_json() if self.tokenizer is not None else None
        write_model_file(path, self.params, config=self.cfg.to_dict(), tokenizer=tok, metadata=meta)

    @classmethod
    def load(cls, path, dtype=np.float32) -> "Model":
        """Load a .cllm file (the weights are copied out of the read-only memory map)."""
        from cllmd.modelfile import ModelFileError, read_model_file
        from cllmd.tokenizer import tokenizer_from_json

        header, tensors = read_model_file(path)
        try:
            cfg = ModelConfig.from_dict(header["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(path, f"bad model config: {e}") from None
        table = param_table(cfg)
        missing = [n for n, _ in table if n not in tensors]
        if missing:
            raise ModelFileError(path, f"missing tensors {missing[:5]}")
        for name, shape in table:
            if tuple(tensors[name].shape) != shape:
                raise ModelFileError(path, f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        flat = np.empty(num_params(cfg), dtype=dtype)
        views = flat_views(flat, table)
        for name, _ in table:
            views[name][...] = tensors[name]
        tok = tokenizer_from_json(header["tokenizer"]) if header.get("tokenizer") else None
        return cls(cfg, dtype=dtype, tokenizer=tok, metadata=header.get("metadata") or {}, _flat=flat)

    def copy(self) -> "Model":
        """A detached copy of the weights (the snapshot inference reads while training goes on)."""
        return Model(self.cfg, dtype=self.dtype, tokenizer=self.tokenizer, metadata=self.metadata,
                     _flat=self.flat.copy())
