"""Node zero: the control sphere that drives the 12 worker spheres through training steps.

Each step node zero samples the global batch, splits it by rows into 12 micro-batches, and
the spheres' gradients are committed into its sum in fixed sphere order as they finish
(cllmd.reduction: a few recycled rows, not one per sphere; in bf16 each sphere adds its weight
matrices' gradients into the sum itself, in the same order); node zero then normalizes by the
token count, skips the step on NaN/Inf, clips by global norm and applies AdamW. Because the
reduction order never depends on which thread ran which sphere, the same seed and data give
bit-identical weights with any thread count. Node zero's own passes (transposed weights,
AdamW) are cut at fixed places and shared over the same thread pool.

Precision (train.precision): float32, or bf16, where node zero also rounds the weight matrices
to bfloat16 once per step (Model.bf16_weights) and the spheres run every product of a weight
in bfloat16 with float32 accumulation; the weights, AdamW, the reduction and everything else
stay float32, and MKL's products are sequential and reproducible, so the weights are still
bit-identical for any thread count.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from cllm.catalogue import check_section, fields_of
from cllmd.kernels.blas import bf16_cpu_features, bf16_unavailable
from cllmd.model import Model, PackedWeights
from cllmd.optim import AdamW, Schedule
from cllmd.reduction import OrderedGradientSum
from cllmd.spheres import MAX_THREADS, NUM_SPHERES, Sphere, SpherePool, ThreadWorkspaces, split_rows
from cllmd.tokensource import DocumentSource, TokenSource

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "cllmd-checkpoint"
# tokens per sphere up to which the spheres use a transposed copy of the weights (see Trainer)
TRANSPOSED_MAX_TOKENS = 128
# train.precision = auto takes bf16 from this model width up. Measured on a quiet machine at 2
# threads (docs/benchmarks.md, "The trainer in bfloat16"): 1.96x float32 at width 768, 1.47x at
# the baby shape and 1.62x at the default shape (width 128), 1.23x at width 64, 0.91x at 32,
# where MKL's per-call cost outweighs the products.
BF16_AUTO_MIN_WIDTH = 64
# in bf16, the spheres add the blocks' weight gradients into node zero's sum themselves (in
# turn, cllmd.kernels.ordered) from this many parameters up; below, the rows stay in cache and
# their commit costs little, while a sphere waiting for its turn can cost more on a loaded
# machine (docs/benchmarks.md, "Third round": 85M 1.04-1.23x the rows, the baby and default
# shapes between 0.6x and 1.1x with the load at 3.9-4.7). Read when a Trainer is made.
DIRECT_MIN_PARAMS = 1 << 24
# in bf16, node zero packs the blocks' weight matrices once per step for the spheres' forward
# and input-gradient products (cllmd.model.PackedWeights: the same bits; MKL no longer repacks
# a weight for every sphere) from this many parameters up. Measured per 85M sphere, one thread:
# those products 149 -> 118 ms (docs/benchmarks.md, "Fourth round"); below, untried.
PACKED_MIN_PARAMS = 1 << 24


def choose_precision(requested: str, width: int, dtype=np.float32) -> tuple[str, str]:
    """(the precision the trainer runs, why) for train.precision = requested and a model of
    this width (n_embd) and dtype. bf16 asked for where it cannot run is an error naming what
    is missing; auto takes bf16 where it runs and measured faster (docs/benchmarks.md, "The
    trainer in bfloat16"), else float32."""
    if requested == "float32":
        return "float32", "train.precision = float32"
    why_not = bf16_unavailable()
    if why_not is None and np.dtype(dtype) != np.float32:
        why_not = f"bfloat16 products accumulate in float32, the model is {np.dtype(dtype)}"
    if requested == "bf16":
        if why_not is not None:
            raise ValueError(f"train.precision = bf16: {why_not}")
        return "bf16", "train.precision = bf16"
    if requested != "auto":
        raise ValueError(f"train.precision must be auto, float32 or bf16, got {requested!r}")
    if why_not is not None:
        return "float32", f"auto: {why_not}"
    if width < BF16_AUTO_MIN_WIDTH:
        return "float32", f"auto: width {width} < {BF16_AUTO_MIN_WIDTH}, where bf16 gains little"
    return "bf16", "auto: MKL and the CPU's " + " and ".join(bf16_cpu_features())


def usable_cores() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, n))


@dataclass
class _OfflineTrainConfig:
    """TrainConfig's fields that are not settings of the daemon (`cllmd train`, benchmarks and
    tests set them), and its checks."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    accum_steps: int = 1          # micro-steps summed into one optimizer step
    eval_windows: int = 240       # fixed validation windows per evaluation
    padded: bool = False          # padded batches (one document per row, loss mask) instead of windows

    def __post_init__(self):
        problem = check_section("train", dataclasses.asdict(self))
        if problem:
            raise ValueError(f"train config: {problem}")
        checks = {"beta1": 0 <= self.beta1 < 1, "beta2": 0 <= self.beta2 < 1, "eps": self.eps > 0,
                  "accum_steps": self.accum_steps >= 1, "eval_windows": self.eval_windows >= 1,
                  "padded": isinstance(self.padded, bool)}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            k = bad[0]
            raise ValueError(f"train config: {k}={getattr(self, k)!r} is out of range")

    @classmethod
    def from_dict(cls, values: dict) -> "_OfflineTrainConfig":
        """From a checkpoint's train_config; one written before decay_steps became
        decay_end_step held the same absolute step under the old name."""
        values = dict(values)
        if "decay_steps" in values:
            values.setdefault("decay_end_step", values.pop("decay_steps"))
        return cls(**values)

    def schedule(self) -> Schedule:
        return Schedule(self.lr, self.min_lr, self.warmup, self.decay_end_step)


# The trainer's configuration: the fields above plus one per setting the trainer reads (those of
# cllm/catalogue.py with applies="trainer": lr, batch_size, decay_end_step, ...), each with the
# catalogue's default, bounds and meaning.
TrainConfig = dataclasses.make_dataclass("TrainConfig", fields_of("trainer"), bases=(_OfflineTrainConfig,))
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = "The trainer's configuration: the catalogue's trainer settings and a few offline ones."


class Trainer:
    """Node zero plus 12 spheres on a pool of N threads. The only writer of the model's weights."""

    bf16_capable = True  # whether every sphere of this trainer can run bfloat16 products

    def __init__(self, model: Model, source: TokenSource, config: TrainConfig, threads: int | None = None):
        if config.padded and not isinstance(source, DocumentSource):
            raise ValueError(f"padded batches need a source that knows its documents (the data "
                             f"store), not a {type(source).__name__}")
        self.model = model
        self.source = source
        self.config = config
        # the weight matrices (blocks' and token embedding) transposed, refreshed at the start
        # of every step where a sphere has at most TRANSPOSED_MAX_TOKENS tokens: there the
        # spheres' head and input-gradient gemms run faster on them (Model.transposed_weights,
        # cllmd.kernels.linear); above, they cost P floats for nothing measurable
        self.weights_t: np.ndarray | None = None
        # with precision bf16: the weight matrices in bfloat16 (Model.bf16_weights), refreshed
        # at the start of every step (and before an evaluation), in place of weights_t
        self.weights_h: np.ndarray | None = None
        # and, from PACKED_MIN_PARAMS up, the blocks' matrices packed (PackedWeights), in place of
        # weights_h's (which then holds only the head's: its block matrices' pages stay unallocated)
        self.weights_p: PackedWeights | None = None
        self.precision, self.precision_reason = self._choose_precision(config.precision)
        log.info("training precision: %s (%s)", self.precision, self.precision_reason)
        self.spheres = [Sphere(i + 1, model) for i in range(NUM_SPHERES)]
        # activations belong to the running threads, not the spheres
        self.workspaces = ThreadWorkspaces(model, checkpointing=config.grad_checkpointing,
                                           bf16=self.precision == "bf16")
        self.pool = SpherePool(threads or usable_cores(), on_exit=self.workspaces.release)
        # one BLAS thread per worker thread, so N workers really use N cores
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")
        self.optimizer = AdamW(model.flat, model.table, weight_decay=config.weight_decay,
                               betas=(config.beta1, config.beta2), eps=config.eps)
        self.rng = np.random.default_rng(config.seed)
        # node zero's gradient sum, committed in sphere order from one row per thread (plus
        # the sum itself for the first sphere): after a step, grad is the sum over the batch
        # of the token losses' gradients (divide by last["tokens"] for the mean; not clipped)
        direct = model.dtype == np.float32 and model.flat.size >= DIRECT_MIN_PARAMS
        self.gradsum = OrderedGradientSum(model.flat.size, model.dtype, rows=self.pool.size,
                                          direct=model.sink_ranges() if direct else None)
        self.grad = self.gradsum.grad
        self.step_num = 0          # optimizer steps taken (skipped ones included)
        self.skipped_steps = 0
        self.tokens_seen = 0
        self.checkpoint_extra: dict | None = None  # what save_checkpoint(extra=) stored, once resumed
        self.last: dict = {}       # the last step's figures
        self.last_eval: dict = {}
        self.tokens_per_second = 0.0
        self._pending_threads: int | None = None
        self._lock = threading.Lock()

    # ---- configuration between steps -----------------------------------------------------------

    def set_threads(self, threads: int) -> None:
        """Dynamic sphere allocation: applied before the next step."""
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be between 1 and {MAX_THREADS}, got {threads}")
        with self._lock:
            self._pending_threads = threads

    @property
    def threads(self) -> int:
        """The pool's thread count, or the one it takes before the next step."""
        with self._lock:
            return self._pending_threads or self.pool.size

    def update_config(self, **changes) -> TrainConfig:
        """Validated changes (lr, batch_size, grad_clip, warmup, ...), applied at the next step."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        new = dataclasses.replace(self.config, **changes)
        precision = self._choose_precision(new.precision) if new.precision != self.config.precision else None
        with self._lock:
            self.config = new
            if precision is not None and precision[0] != self.precision:
                log.info("training precision: %s (%s), from the next step", *precision)
                self.precision, self.precision_reason = precision
                self.workspaces.bf16 = self.precision == "bf16"  # threads reallocate at their next sphere
            self.optimizer.weight_decay = new.weight_decay
            self.optimizer.beta1, self.optimizer.beta2, self.optimizer.eps = new.beta1, new.beta2, new.eps
            self.workspaces.checkpointing = new.grad_checkpointing  # threads reallocate at their next sphere
        return new

    def _apply_pending(self) -> None:
        with self._lock:
            n, self._pending_threads = self._pending_threads, None
        if n is not None and n != self.pool.size:
            self.pool.resize(n)
            self.gradsum.resize(n)
            log.info("trainer now runs its 12 spheres on %d thread(s)", n)

    # ---- one step ------------------------------------------------------------------------------

    def _sample(self, B: int, T: int):
        if self.config.padded:
            return self.source.padded_batch(self.rng, B, T, "train")
        x, y = self.source.sample_batch(self.rng, B, T, "train")
        return x, y, None

    def _dispatch(self, x, y, mask, forward_only: bool, overwrite: bool = True, norm: bool = False) -> list[Sphere]:
        """Fills the spheres' slots by rows, runs them, returns the spheres that had work.

        With gradients, each sphere's is committed into self.grad in sphere order as it
        finishes (= for the first sphere if overwrite, += otherwise; norm: then fill the
        per-block sums of squares)."""
        used = []
        T = x.shape[1]
        most = max(b - a for a, b in split_rows(x.shape[0]))  # the workspaces hold the largest slot
        for sphere, (a, b) in zip(self.spheres, split_rows(x.shape[0])):
            if a == b:
                sphere._set_state("sitting_out")
                continue
            sphere.idx = np.ascontiguousarray(x[a:b])
            sphere.targets = np.ascontiguousarray(y[a:b])
            sphere.mask = None if mask is None else np.ascontiguousarray(mask[a:b])
            used.append(sphere)
        def workspace(sphere):
            return self.workspaces.get(sphere.idx.shape[0], T, capacity=most)

        if forward_only:
            self.pool.run([lambda s=s: s.compute(True, workspace(s)) for s in used])
            return used
        gradsum = self.gradsum
        # bf16: the spheres add the blocks' weight gradients into the sum themselves, in turn
        gradsum.begin([s.id for s in used], overwrite, norm, direct=self.precision == "bf16")

        def task(sphere):
            row = gradsum.take(sphere.id)
            if row is None:  # another sphere failed: its error is the step's
                return
            try:
                sphere.compute(False, workspace(sphere), grad=row, sink=gradsum.sink(sphere.id))
            except BaseException:
                gradsum.give_back(row)
                gradsum.abort()
                raise
            gradsum.give(sphere.id, row)

        self.pool.run([lambda s=s: task(s) for s in used])
        return used

    def _choose_precision(self, requested: str) -> tuple[str, str]:
        if requested != "float32" and not self.bf16_capable:
            if requested == "bf16":
                raise ValueError(f"train.precision = bf16: not available with {type(self).__name__}")
            return "float32", f"auto: {type(self).__name__} runs float32 products"
        return choose_precision(requested, self.model.cfg.n_embd, self.model.dtype)

    def _refresh_weight_copies(self) -> None:
        """The spheres' copies of the current weights, one layer (or the head) per task: in
        bf16, weights_h (and weights_p, its block matrices packed, for large models); in
        float32, weights_t (the matrices transposed) when this step's
        spheres are small enough for them to pay, else none."""
        parts = range(self.model.cfg.n_layer + 1)
        tokens = -(-self.config.batch_size // NUM_SPHERES) * self.model.cfg.block_size
        if self.precision == "bf16":
            self.weights_t = None
            if self.weights_h is None:
                self.weights_h = np.zeros(2 * self.model.flat.size, dtype=np.uint16)
            if self.weights_p is None and self.model.flat.size >= PACKED_MIN_PARAMS:
                self.weights_p = PackedWeights(self.model, tokens)

            def refresh(part):
                if self.weights_p is not None and part < self.model.cfg.n_layer:
                    self.weights_p.fill((part,))
                else:
                    self.model.bf16_weights(self.weights_h, (part,))
            self.pool.run([lambda part=part: refresh(part) for part in parts])
        elif tokens > TRANSPOSED_MAX_TOKENS:
            self.weights_h = self.weights_p = None
            self.weights_t = None
        else:
            if self.weights_t is None:
                self.weights_t = np.zeros_like(self.model.flat)
            self.weights_h = self.weights_p = None
            self.pool.run([lambda part=part: self.model.transposed_weights(self.weights_t, (part,))
                           for part in parts])
        for s in self.spheres:
            s.weights_t, s.weights_h, s.weights_p = self.weights_t, self.weights_h, self.weights_p

    def step(self) -> dict:
        """One optimizer step (accum_steps micro-steps); returns its figures."""
        self._apply_pending()
        cfg = self.config
        T = self.model.cfg.block_size
        t0 = time.perf_counter()
        self._refresh_weight_copies()
        loss_sum = 0.0
        count = 0.0
        for micro in range(cfg.accum_steps):
            x, y, mask = self._sample(cfg.batch_size, T)
            # accumulation adds, never overwrites (the first micro-step starts the sum)
            used = self._dispatch(x, y, mask, forward_only=False, overwrite=micro == 0,
                                  norm=micro == cfg.accum_steps - 1)
            for s in used:
                loss_sum += s.result[0] * s.result[1]
                count += s.result[1]
        self.gradsum.finish(self.pool.run)  # the norm's sums, where the spheres left them
        lr = cfg.schedule()(self.step_num)
        loss = loss_sum / count if count else float("nan")
        # the norm of the mean gradient: ||sum|| / count, from the fixed per-block partials
        grad_norm = math.sqrt(float(self.gradsum.sumsq.sum())) / count if count else float("nan")
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            # clipping as cllmd.optim.clip_by_global_norm, folded with 1/count into AdamW
            clip = cfg.grad_clip / (grad_norm + 1e-6) if 0 < cfg.grad_clip < grad_norm else 1.0
            self.optimizer.step(self.grad, lr, grad_scale=clip / count, run=self.pool.run)
        if skipped:
            self.skipped_steps += 1
            log.warning("step %d skipped: loss %s, gradient norm %s (non-finite or empty batch)",
                        self.step_num, loss, grad_norm)
        self.step_num += 1
        self.tokens_seen += int(count)
        seconds = time.perf_counter() - t0
        tps = count / seconds if seconds > 0 else 0.0
        self.tokens_per_second = tps if self.tokens_per_second == 0 else 0.9 * self.tokens_per_second + 0.1 * tps
        for s in used:
            s._set_state("idle")  # spheres that sat this step out keep saying so
        self.last = {"step": self.step_num, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens": int(count), "seconds": seconds, "skipped": skipped}
        return self.last

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluate(self, split: str = "val") -> dict:
        """Loss and perplexity on the source's fixed evaluation windows, plus per-group loss.

        Symmetry groups: the target token id mod 12; each group's mean loss is reported.
        """
        self._apply_pending()
        if self.precision == "bf16":  # the forward reads bfloat16 copies of the current weights
            self._refresh_weight_copies()
        T = self.model.cfg.block_size
        x, y = self.source.eval_windows(self.config.eval_windows, T, split=split)
        loss_sum, count = 0.0, 0.0
        group_sum = np.zeros(NUM_SPHERES)
        group_count = np.zeros(NUM_SPHERES)
        B = max(self.config.batch_size, NUM_SPHERES)
        for a in range(0, x.shape[0], B):
            used = self._dispatch(x[a:a + B], y[a:a + B], None, forward_only=True)
            for s in used:
                loss_sum += s.result[0] * s.result[1]
                count += s.result[1]
                groups = s.targets.reshape(-1) % NUM_SPHERES
                group_sum += np.bincount(groups, weights=s.losses, minlength=NUM_SPHERES)
                group_count += np.bincount(groups, minlength=NUM_SPHERES)
        for s in self.spheres:
            if s.stats.state == "waiting":
                s._set_state("idle")
        loss = loss_sum / count if count else float("nan")
        groups = [float(gs / gc) if gc else None for gs, gc in zip(group_sum, group_count)]
        self.last_eval = {"step": self.step_num, f"{split}_loss": loss,
                          "perplexity": math.exp(min(loss, 700.0)), "group_loss": groups}
        return self.last_eval

    # ---- statistics ----------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Figures for status displays (safe to call from another thread)."""
        last = dict(self.last)
        return {
            "step": self.step_num, "tokens_seen": self.tokens_seen, "loss": last.get("loss"),
            "val_loss": self.last_eval.get("val_loss"), "perplexity": self.last_eval.get("perplexity"),
            "lr": last.get("lr"), "grad_norm": last.get("grad_norm"),
            "tokens_per_second": self.tokens_per_second, "skipped_steps": self.skipped_steps,
            "threads": self.pool.size, "batch_size": self.config.batch_size, "precision": self.precision,
            "spheres": [s.snapshot() for s in self.spheres],
        }

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, path, extra: dict | None = None) -> None:
        """Model, AdamW moments, step, RNG state and configuration, written atomically (one file,
        one rename). `extra` (the controller's training plan) is stored with them, so a plan
        and the weights it belongs to are never paired from different steps."""
        meta = {
            "kind": CHECKPOINT_KIND,
            "step": self.step_num, "skipped_steps": self.skipped_steps, "tokens_seen": self.tokens_seen,
            # PCG64's state holds 128-bit integers, which msgpack cannot carry: keep it as JSON text
            "rng_state": json.dumps(self.rng.bit_generator.state),
            "optimizer": self.optimizer.state(),
            "train_config": dataclasses.asdict(self.config),  # precision as asked (auto, ...)
            "precision": self.precision,                      # and as it ran
            "time": time.time(),
        }
        if extra is not None:
            meta["extra"] = extra
        from cllmd.modelfile import write_model_file
        tensors = dict(self.model.params)
        tensors["optim.m"] = self.optimizer.m
        tensors["optim.v"] = self.optimizer.v
        tok = self.model.tokenizer.to_json() if self.model.tokenizer is not None else None
        write_model_file(path, tensors, config=self.model.cfg.to_dict(), tokenizer=tok,
                         metadata={**self.model.metadata, "checkpoint": meta})

    @classmethod
    def from_checkpoint(cls, path, source, threads: int | None = None, **config_changes) -> "Trainer":
        """A trainer that continues exactly where the checkpoint left off."""
        from cllmd.modelfile import ModelFileError, read_model_file
        header, tensors = read_model_file(path)
        meta = (header.get("metadata") or {}).get("checkpoint")
        if not meta or meta.get("kind") != CHECKPOINT_KIND:
            raise ModelFileError(path, "not a cllmd checkpoint (no optimizer state)")
        model = Model.load(path)
        model.metadata.pop("checkpoint", None)
        config = TrainConfig.from_dict({**meta["train_config"], **config_changes})
        trainer = cls(model, source, config, threads)
        trainer.optimizer.load_state(meta["optimizer"], tensors["optim.m"], tensors["optim.v"])
        trainer.rng.bit_generator.state = json.loads(meta["rng_state"])
        trainer.step_num = int(meta["step"])
        trainer.skipped_steps = int(meta["skipped_steps"])
        trainer.tokens_seen = int(meta["tokens_seen"])
        trainer.checkpoint_extra = meta.get("extra")
        return trainer

    def close(self) -> None:
        self.pool.close()
        for s in self.spheres:
            s._set_state("stopped")
        self._blas_limit.restore_original_limits()
