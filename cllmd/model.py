"""The CLLM: a GPT-2 style decoder with explicit, layer-by-layer forward and backward passes.

Parameters live in one flat buffer with named views in GPT-2's checkpoint layout; activations
for a (B, T) live in a Workspace allocated once and reused. Each pass is one nogil kernel call
(cllmd.kernels.transformer: BLAS gemms and numba loops, written layer by layer).
"""
from __future__ import annotations

import dataclasses
import math
import mmap
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cllmd.kernels.ordered import ROW, TILE, tile_pack_size
from cllmd.kernels.blas import pack_bf16_size
from cllmd.kernels.transformer import (LAYER, LN_EPS, Buffers, bf16_weights, model_forward, model_forward_backward,
                                       model_forward_loss, pack_weights, sink_zero_grads, transpose_weights)

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


HEAD_CHUNK_BYTES = 32 << 20  # the fused head's logits chunk: [R, V] of at most this (>= 64 rows)


def head_chunk_rows(vocab_size: int, dtype=np.float32) -> int:
    """Rows R of the fused head's logits chunk: 32 MiB of them, at least 64 (at V = 50257 in
    float32, 166 rows instead of a [1024, V] block of 206 MB per sequence)."""
    return max(64, HEAD_CHUNK_BYTES // (vocab_size * np.dtype(dtype).itemsize))


class Workspace:
    """Activations for up to B rows of T positions: one allocation, carved into named buffers.

    A trainer thread owns one and runs every sphere it takes in it (use(B) re-carves it for a
    smaller micro-batch), so the activation memory grows with the threads, not the spheres.
    With checkpointing, per-layer activations keep one slot instead of n_layer: the backward
    recomputes each block's activations from its input (the residual stream, kept for every
    layer). head_rows: the fused head's chunk of logits (None: all B * T rows, as
    Model.forward_into needs; the trainer passes head_chunk_rows). bf16: also the bfloat16
    scratch the mixed-precision passes round their products' inputs into (h_in, h_out: 2 bytes
    per element, 4 N C + max(4 N C, N V) of them), the softmax in bfloat16 (att_h, in place
    of float32's att) and the products' inputs (acts_h, in place of float32's ln1, atty, ln2,
    fch_gelu), and the scratch a weight gradient's operand is packed into when it is added in
    turn (dw_pack, ~10-15 MB, untouched in the row mode: its pages stay unallocated); without
    it they are empty.
    """

    def __init__(self, cfg: ModelConfig, B: int, T: int, dtype=np.float32, grad_flat: np.ndarray | None = None,
                 checkpointing: bool = False, head_rows: int | None = None, bf16: bool = False):
        # grad_flat: where forward_backward writes gradients when not given another buffer;
        # allocated on first use (the trainer's workspaces never use it: spheres write into
        # rows of node zero's gradient sum)
        self.cfg, self.T, self.dtype, self.checkpointing = cfg, T, np.dtype(dtype), bool(checkpointing)
        self.capacity, self.head_rows, self.bf16 = B, head_rows, bool(bf16)
        if self.bf16 and self.dtype != np.float32:
            raise ValueError(f"bfloat16 products accumulate in float32: a {self.dtype} workspace cannot have them")
        self._arena = np.empty(sum(-(-math.prod(shape) // 16) * 16 for shape in self._shapes(B).values()),
                               dtype=self.dtype)
        self._arena_h = np.empty(sum(-(-n // 32) * 32 for n in self._sizes_h(B).values()), dtype=np.uint16)
        self._ones = np.ones(B * T, dtype=self.dtype)
        self.use(B)
        self.table = param_table(cfg)
        self.num_params = num_params(cfg)
        self._grad_flat = grad_flat

    def _shapes(self, B: int) -> dict[str, tuple[int, ...]]:
        cfg, T = self.cfg, self.T
        C, V, NH, L = cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.n_layer
        N = B * T
        Lc = 1 if self.checkpointing else L
        R = N if self.head_rows is None else max(1, min(N, self.head_rows))
        # bf16 keeps the softmax in att_h and the products' inputs in acts_h: att is then one
        # head's float32 scratch, atty one layer's, and ln1, ln2, fch_gelu go unused
        Lf = 1 if self.bf16 else Lc
        return dict(
            encoded=(N, C),
            ln1=(Lf, N, C), ln1_mean=(Lc, N), ln1_rstd=(Lc, N),
            qkv=(Lc, B, T, 3 * C), att=(1, 1, 1, T, T) if self.bf16 else (Lc, B, NH, T, T),
            atty=(Lf, B, T, C), residual2=(Lc, N, C),
            ln2=(Lf, N, C), ln2_mean=(Lc, N), ln2_rstd=(Lc, N),
            fch=(Lc, N, 4 * C), fch_gelu=(Lf, N, 4 * C),
            residual3=(L, N, C),
            lnf=(N, C), lnf_mean=(N,), lnf_rstd=(N,),
            logits=(R, V),  # a chunk of rows: logits, then probabilities, then dlogits, in place
            losses=(N,), dlosses=(N,),
            dresidual=(N, C), dtmp=(N, C), dqkv=(B, T, 3 * C), dfch=(N, 4 * C),
            empty=(0, C),
            dw_tile=(TILE,) if self.bf16 else (0,),
        )

    def _sizes_h(self, B: int) -> dict[str, int]:
        """Elements of the bfloat16 buffers (Buffers.h_in, h_out, att_h, acts_h) for B rows."""
        if not self.bf16:
            return dict(h_in=0, h_out=0, att_h=0, acts_h=0, dw_pack=0)
        cfg, T = self.cfg, self.T
        N, C, V = B * T, cfg.n_embd, cfg.vocab_size
        R = N if self.head_rows is None else max(1, min(N, self.head_rows))
        Lc = 1 if self.checkpointing else cfg.n_layer
        return dict(h_in=4 * N * C, h_out=max(4 * N * C, N * V), att_h=Lc * B * cfg.n_head * T * T,
                    acts_h=Lc * 7 * N * C,
                    dw_pack=max(tile_pack_size(K, M, N) for K, M in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C))))

    def use(self, B: int) -> "Workspace":
        """Carves the buffers for B rows (B <= capacity), each contiguous, from the one allocation."""
        if not 1 <= B <= self.capacity:
            raise ValueError(f"workspace holds 1 to {self.capacity} rows, asked for {B}")
        views, at = {}, 0
        for name, shape in self._shapes(B).items():
            n = math.prod(shape)
            views[name] = self._arena[at:at + n].reshape(shape)
            at += -(-n // 16) * 16  # 64-byte steps in float32
        at = 0
        for name, n in self._sizes_h(B).items():
            if at + n > self._arena_h.size:  # MKL's packing scratch grew with fewer rows
                raise RuntimeError(f"workspace: {B} rows need more bfloat16 scratch than {self.capacity} held")
            views[name] = self._arena_h[at:at + n]
            at += -(-n // 32) * 32  # 64-byte steps in uint16
        self.buffers = Buffers(**views)
        for name, array in zip(Buffers._fields, self.buffers):
            setattr(self, name, array)
        self.B = B
        self.ones = self._ones[:B * self.T]  # the loss weights when there is no mask
        return self

    @property
    def grad_flat(self) -> np.ndarray:
        if self._grad_flat is None:
            self._grad_flat = np.zeros(self.num_params, dtype=self.dtype)
        return self._grad_flat

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return flat_views(self.grad_flat, self.table)

    @property
    def nbytes(self) -> int:
        """Bytes of the activation buffers (the gradient buffer not included)."""
        return self._arena.nbytes + self._arena_h.nbytes + self._ones.nbytes


def param_offsets(cfg: ModelConfig) -> np.ndarray:
    """Offsets into the flat buffer in the order cllmd.kernels.transformer expects (see there)."""
    offsets, at = {}, 0
    for name, shape in param_table(cfg):
        offsets[name] = at
        at += math.prod(shape)
    head = [offsets[n] for n in ("wte", "wpe", "ln_f.weight", "ln_f.bias")]
    layers = [offsets[f"h.{l}.{n}"] for l in range(cfg.n_layer) for n in LAYER]
    return np.array(head + layers, dtype=np.int64)


class PackedWeights:
    """The blocks' weight matrices in bfloat16 packed once as their products' second operands,
    each for the forward (W) and the input gradient (W^T) (cllmd.kernels.transformer's
    pack_weights, MKL's internal layout): every sphere's product then reads them as they are,
    where gemm_bf16 repacks its operand at every call. The same bits as the unpacked products.
    buf: uint16 in an anonymous map of its own, without transparent huge pages: MKL's layout
    reserves 3-8x what it writes, in 4 KiB-page gaps (measured: 1.01x the matrix's pages
    touched), which stay unallocated there, where 2 MiB pages took them all (85M's peak RSS
    +815 MiB, against ~2 bytes per weight and side, +340); at [4 L, 2, 2]: the (start, stop) of
    each sink matrix's two sides. rows: the products' rows the layout is made for
    (MKL's choice of blocking; products of any row count read it)."""

    def __init__(self, model: "Model", rows: int):
        self.model, self.rows = model, int(rows)
        C, at, spans = model.cfg.n_embd, 0, []
        for _ in range(model.cfg.n_layer):
            for K, M in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)):  # sink order: c_attn, c_proj, c_fc, mlp.c_proj
                for n, k in ((M, K), (K, M)):                         # op(b) = W [K, M], then W^T [M, K]
                    size = pack_bf16_size(self.rows, n, k)
                    spans.append((at, at + size))
                    at += size
        self.at = np.array(spans, dtype=np.int64).reshape(-1, 2, 2)
        self._map = mmap.mmap(-1, max(2 * at, mmap.PAGESIZE))  # zeros, page-aligned, allocated when written
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self.buf = np.frombuffer(self._map, dtype=np.uint16, count=at)
        self._scratch: dict[int, np.ndarray] = {}  # fill's rounding scratch, per thread

    def fill(self, parts=None) -> None:
        """Packs the model's current block matrices, rounded to bfloat16 as Model.bf16_weights
        rounds them, for the given parts (layers; n_layer, the head, has none), all by default.
        The passes given them read weights_h only for the head: its block matrices need not be
        written (Model.bf16_weights(out, (n_layer,)) is then all they need). Threads may fill
        different parts at once: each rounds through a scratch matrix of its own, kept."""
        m = self.model
        key = threading.get_ident()
        scratch = self._scratch.get(key)
        if scratch is None:
            scratch = self._scratch.setdefault(key, np.empty(4 * m.cfg.n_embd ** 2, np.uint16))
        for part in range(m.cfg.n_layer + 1) if parts is None else parts:
            pack_weights(self.buf, self.at, m.flat, m.offsets, part, m.cfg.n_embd, self.rows, scratch)


class Model:
    """Parameters (GPT-2 names and shapes) plus forward, backward, save and load."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, dtype=np.float32, tokenizer=None,
                 metadata: dict | None = None, _flat: np.ndarray | None = None):
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        self.tokenizer = tokenizer
        self.metadata = dict(metadata or {})
        self.table = param_table(cfg)
        self.offsets = param_offsets(cfg)
        if _flat is None:
            self.flat = np.zeros(num_params(cfg), dtype=self.dtype)
            self.params = flat_views(self.flat, self.table)
            self._init(seed)
        else:
            self.flat = _flat
            self.params = flat_views(self.flat, self.table)
        self.clock = clock_features(cfg.block_size, cfg.n_embd).astype(self.dtype) if cfg.clock_positions else None
        self._workspace: Workspace | None = None
        self._no_transpose = np.empty(0, dtype=self.dtype)
        self._no_bf16 = np.empty(0, dtype=np.uint16)
        self._no_pack_at = np.empty((0, 2, 2), dtype=np.int64)
        # a sink of mode ROW: the weight gradients written into grad (cllmd.kernels.ordered)
        self._row_sink = (np.empty(0, dtype=self.dtype), np.zeros(1, np.int64), np.array([0, ROW, 0, 0], np.int64),
                          np.zeros((0, 2), np.int64))

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

    def workspace(self, B: int, T: int, checkpointing: bool = False, bf16: bool = False) -> Workspace:
        """The model's own cached workspace for (B, T) (single-threaded use)."""
        ws = self._workspace
        if ws is None or (ws.B, ws.T, ws.checkpointing, ws.bf16) != (B, T, checkpointing, bf16) or ws.dtype != self.dtype:
            ws = self._workspace = Workspace(self.cfg, B, T, self.dtype, checkpointing=checkpointing, bf16=bf16)
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

    def _positions(self) -> np.ndarray:
        """The position table in use: learned, plus the fixed clock features when enabled."""
        return self.params["wpe"] if self.clock is None else self.params["wpe"] + self.clock

    def _ids(self, ws: Workspace, a, what: str) -> np.ndarray:
        # the kernels trust shapes (numba does not bounds-check): the workspace fixes (B, T)
        # and the dtype; the kernels themselves refuse ids outside the vocabulary
        if ws.dtype != self.dtype or ws.num_params != self.flat.size:
            raise ValueError(f"workspace ({ws.dtype}, {ws.num_params} gradients) does not fit this model "
                             f"({self.dtype}, {self.flat.size} parameters)")
        a = np.ascontiguousarray(a, dtype=np.int64)  # one dtype: one compiled kernel
        if a.shape != (ws.B, ws.T):
            raise ValueError(f"{what} has shape {a.shape}, the workspace is for {(ws.B, ws.T)}")
        return a

    def _weights(self, ws: Workspace, mask, N: int) -> tuple[np.ndarray, float]:
        """Per-position loss weights [N] and their sum (the count of positions that count)."""
        if mask is None:
            return ws.ones, float(N)
        if np.size(mask) != ws.B * ws.T:
            raise ValueError(f"mask has {np.size(mask)} entries, the workspace is for {(ws.B, ws.T)}")
        weights = np.ascontiguousarray(np.reshape(mask, N), dtype=ws.dtype)
        return weights, float(weights.sum(dtype=np.float64))

    # ---- forward -----------------------------------------------------------------------------

    def forward_into(self, ws: Workspace, idx: np.ndarray) -> np.ndarray:
        """Forward pass saving every activation in ws; returns logits [B*T, V] (a view of ws).

        idx [B, T] must match the workspace's (B, T), whose head must hold all B * T rows
        (head_rows None). One kernel call (cllmd.kernels.transformer).
        """
        if ws.logits.shape[0] != ws.B * ws.T:
            raise ValueError(f"workspace's head holds {ws.logits.shape[0]} rows of logits, not all {ws.B * ws.T}")
        model_forward(ws.buffers, self._ids(ws, idx, "idx"), self.flat, self._no_transpose, self.offsets,
                 self._positions(), self.cfg.n_head)
        return ws.logits

    def forward(self, idx) -> np.ndarray:
        """Logits [B, T, V] (a fresh array) for token ids idx [B, T]."""
        idx = self._check_idx(idx)
        B, T = idx.shape
        ws = self.workspace(B, T)
        return self.forward_into(ws, idx).reshape(B, T, -1).copy()

    # ---- forward + backward ------------------------------------------------------------------

    def forward_loss(self, ws: Workspace, idx: np.ndarray, targets: np.ndarray,
                     mask: np.ndarray | None = None, weights_h: np.ndarray | None = None,
                     weights_p: PackedWeights | None = None) -> tuple[float, float]:
        """Forward only: (mean cross-entropy over counted positions, count); ws.losses per position.
        weights_h: an up-to-date bf16_weights() buffer (the products in bfloat16), or None;
        weights_p: the block matrices packed (PackedWeights, filled; weights_h's are then not
        read), or None."""
        weights, count = self._weights(ws, mask, idx.size)
        flat_h = self._check_bf16(ws, weights_h)
        packed, pack_at = self._packed(weights_p, flat_h)
        total = model_forward_loss(ws.buffers, self._ids(ws, idx, "idx"), self._ids(ws, targets, "targets"), weights,
                                   self.flat, self._no_transpose, flat_h, packed, pack_at, self.offsets,
                                   self._positions(), self.cfg.n_head)
        return (total / count if count else 0.0), count

    def bf16_weights(self, out: np.ndarray | None = None, parts=None) -> np.ndarray:
        """The weight matrices rounded to bfloat16 (uint16 bits, round to nearest even), [2P]:
        each at its own offset, and its transpose at P + offset (cllmd.kernels.transformer).

        forward_backward(weights_h=...) and forward_loss(weights_h=...) then run every product
        of a weight matrix in bfloat16 with float32 accumulation; the weights themselves stay
        float32 (the optimizer's), so this copy must be refreshed whenever they change. parts:
        as for transposed_weights.
        """
        if self.dtype != np.float32:
            raise ValueError(f"bfloat16 weights are made from float32 ones, this model is {self.dtype}")
        if out is None:
            out = np.zeros(2 * self.flat.size, dtype=np.uint16)
        for part in range(self.cfg.n_layer + 1) if parts is None else parts:
            bf16_weights(out, self.flat, self.offsets, part, self.cfg.n_embd)
        return out

    def _check_bf16(self, ws: Workspace, weights_h: np.ndarray | None) -> np.ndarray:
        """weights_h checked against the model and the workspace (empty: float32 products)."""
        if weights_h is None:
            return self._no_bf16
        if weights_h.shape != (2 * self.flat.size,) or weights_h.dtype != np.uint16:
            raise ValueError(f"weights_h has shape {weights_h.shape} and dtype {weights_h.dtype}, "
                             f"expected ({2 * self.flat.size},) uint16 (Model.bf16_weights)")
        if not ws.bf16:
            raise ValueError("bfloat16 products need a workspace with bfloat16 scratch (Workspace(bf16=True))")
        return weights_h

    def _packed(self, weights_p: PackedWeights | None, flat_h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(packed, pack_at) for the passes: weights_p's, or empty ones for None."""
        if weights_p is None:
            return self._no_bf16, self._no_pack_at
        if not flat_h.size:
            raise ValueError("packed weights (weights_p) are bfloat16 operands: they need weights_h as well")
        if weights_p.at.shape != (4 * self.cfg.n_layer, 2, 2):
            raise ValueError(f"weights_p was laid out for {weights_p.at.shape[0] // 4} layers, this model has "
                             f"{self.cfg.n_layer}")
        return weights_p.buf, weights_p.at

    def sink_ranges(self) -> np.ndarray:
        """[4 n_layer, 2] the (start, stop) in flat of the blocks' weight matrices, in sink
        order (cllmd.kernels.ordered): layer by layer, each layer's four by offset."""
        o = self.offsets
        sizes = {2: 3, 4: 1, 8: 4, 10: 4}  # in C * C
        C = self.cfg.n_embd
        return np.array([(o[4 + 12 * l + k], o[4 + 12 * l + k] + sizes[k] * C * C)
                         for l in range(self.cfg.n_layer) for k in (2, 4, 8, 10)], dtype=np.int64).reshape(-1, 2)

    def transposed_weights(self, out: np.ndarray | None = None, parts=None) -> np.ndarray:
        """The weight matrices transposed, each at its own offset in a flat-sized buffer.

        forward_backward(weights_t=...) uses them for the head and the input gradients (plain
        products run faster than ones against a transposed operand); they must be refreshed
        whenever the weights change. parts: indices in range(n_layer + 1), part n_layer being
        the token embedding (default all), so callers can spread the work over threads.
        """
        if out is None:
            out = np.zeros_like(self.flat)
        for part in range(self.cfg.n_layer + 1) if parts is None else parts:
            transpose_weights(out, self.flat, self.offsets, part, self.cfg.n_embd)
        return out

    def forward_backward(self, ws: Workspace, idx: np.ndarray, targets: np.ndarray,
                         mask: np.ndarray | None = None, normalizer: float | None = None,
                         weights_t: np.ndarray | None = None, grad: np.ndarray | None = None,
                         weights_h: np.ndarray | None = None, sink=None,
                         weights_p: PackedWeights | None = None) -> tuple[float, float]:
        """Loss and gradients of one batch into grad (a flat [P] buffer, written whole), by
        default ws.grad_flat (ws.grads are its named views).

        The loss is the mean cross-entropy over the positions where mask is 1 (all of them when
        mask is None); masked positions contribute neither loss nor gradient. ws.grads receives
        d(sum of counted losses / normalizer)/d(params); normalizer defaults to the count, i.e.
        the gradient of the mean (the trainer passes 1 and divides once after its reduction).
        With a checkpointing workspace the blocks recompute their activations in the backward.
        weights_t: an up-to-date transposed_weights() buffer, or None; weights_h: an up-to-date
        bf16_weights() buffer for bfloat16 products (weights_t is then not read), or None.
        sink: with bfloat16 products, node zero's (sum, turns, info, ranges) (cllmd.reduction's
        OrderedGradientSum.sink): the blocks' weight gradients are then added in turn into the
        sum (mode ADD: grad's views of them are left as they were) or written and announced
        (FIRST); None writes them into grad. weights_p: the block matrices packed (PackedWeights;
        the same bits, faster products; weights_h's are then not read), or None. Returns (mean loss, number of
        counted positions).
        """
        weights, count = self._weights(ws, mask, idx.size)
        grad = ws.grad_flat if grad is None else grad
        if grad.shape != self.flat.shape or grad.dtype != self.dtype:
            raise ValueError(f"grad has shape {grad.shape} and dtype {grad.dtype}, expected {self.flat.shape} {self.dtype}")
        flat_h = self._check_bf16(ws, weights_h)
        packed, pack_at = self._packed(weights_p, flat_h)
        if sink is None:
            sink = self._row_sink
        elif sink[2][1] != ROW and not flat_h.size:
            raise ValueError("a sink that adds weight gradients in turn needs bfloat16 products (weights_h)")
        if count == 0.0:
            self.forward_loss(ws, idx, targets, mask, weights_h, weights_p)
            grad[:] = 0.0
            sink_zero_grads(self.offsets, self.cfg.n_embd, sink)
            return 0.0, 0.0
        scale = 1.0 / (count if normalizer is None else normalizer)
        flat_t = self._no_transpose if weights_t is None else weights_t
        if flat_t.size and flat_t.shape != self.flat.shape:
            raise ValueError(f"weights_t has shape {flat_t.shape}, expected {self.flat.shape}")
        total = model_forward_backward(ws.buffers, self._ids(ws, idx, "idx"), self._ids(ws, targets, "targets"), weights,
                                       scale, self.flat, flat_t, flat_h, packed, pack_at, self.offsets,
                                       self._positions(), self.cfg.n_head, grad, sink)
        return total / count, count

    def loss_and_grads(self, idx, targets, mask=None, checkpointing: bool = False,
                       bf16: bool = False) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy and its gradients (fresh arrays, same keys as params); bf16: with
        the products in bfloat16 (float32 accumulation), as the trainer's precision "bf16"."""
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
        ws = self.workspace(B, T, checkpointing, bf16)
        loss, _ = self.forward_backward(ws, idx, targets, mask, weights_h=self.bf16_weights() if bf16 else None)
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
