"""The training controller (controller.py; trainer.py is node zero, queuedir.py and watcher.py
the file queue): runs node zero on its own thread inside the daemon.

It turns new tokens into a step budget (auto-training), obeys start/stop/pause/resume at step
boundaries, writes checkpoints by step count, by time, on request and on shutdown, publishes a
weights snapshot for inference every few steps, and reports statistics without ever letting a
subscriber block a training step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cllm.catalogue import field_of, fields_of, runtime_settings
from cllmd.model import Model
from cllmd.tokensource import ReplayMix
from cllmd.trainer import Trainer

log = logging.getLogger(__name__)

# train.config.get/set keys (the catalogue's runtime settings) and where they go: the trainer's
# TrainConfig or the controller itself
CONFIG_KEYS = tuple(s.name for s in runtime_settings())
TRAINER_KEYS = frozenset(s.name for s in runtime_settings() if s.applies == "trainer")
CONTROLLER_KEYS = frozenset(s.name for s in runtime_settings() if s.applies == "controller")
assert TRAINER_KEYS | CONTROLLER_KEYS == set(CONFIG_KEYS)


@dataclass
class _ControllerOwn:
    events_interval: float = field_of("server.events_interval")  # of the "train" events


# The controller's settings: the catalogue's settings with applies="controller" (but threads,
# which the trainer's pool holds), defaults from the catalogue, plus the events interval.
ControllerSettings = dataclasses.make_dataclass(
    "ControllerSettings", fields_of("controller", exclude=("threads",)), bases=(_ControllerOwn,))
ControllerSettings.__module__ = __name__


class TrainingController:
    """Owns the Trainer (the only writer of the weights) and the thread that runs it."""

    def __init__(self, trainer: Trainer, *, checkpoint_path: Path, model_path: Path,
                 settings: ControllerSettings, publish: Callable[[str, dict], None] | None = None):
        self.trainer = trainer
        self.mix = trainer.source if isinstance(trainer.source, ReplayMix) else None
        if self.mix is not None:
            self.mix.replay_fraction = settings.replay_fraction
        # The training plan of versions before 0.2 (since then it lives in the checkpoint).
        self.legacy_plan_path = Path(checkpoint_path).with_name("training.json")
        self.checkpoint_path = Path(checkpoint_path)
        self.model_path = Path(model_path)
        self.settings = settings
        self.publish = publish or (lambda topic, payload: None)
        self.state = "idle"            # idle | running | paused | stopping | stopped
        self.budget = 0                # steps still to take
        self.budget_total = 0
        self.reason = ""               # why the current budget exists (auto / manual)
        # Offset of the train stream up to which stored tokens have been turned into budget.
        # Checkpointed with the budget; the tokens the data store holds beyond it are owed.
        self.credited = 0
        # The trainer's step when the budget was last charged for a step: a status read between
        # a step's end and its charge must not count that step both done and still owed.
        self._charged_step = trainer.step_num
        self._checkpoint_asked = False  # a checkpoint wanted by someone who does not wait
        self._cond = threading.Condition()
        self._paused = False
        self._checkpoint_waiters: list[threading.Event] = []
        self._pending_threads: int | None = None
        self._snapshot = trainer.model.copy()   # what inference reads; replaced, never mutated
        self._last_checkpoint_step = trainer.step_num
        self._last_checkpoint_time = time.monotonic()
        # the last checkpoint written, for status views: {step, time (Unix)}; after a restart
        # the one resumed from (its file's time), None before the first
        self.last_checkpoint: dict | None = None
        if self.checkpoint_path.exists():
            self.last_checkpoint = {"step": trainer.step_num,
                                    "time": self.checkpoint_path.stat().st_mtime}
        self._last_publish = 0.0
        self.last_error: str | None = None
        self.step_seconds = 0.0

    def plan(self) -> dict:
        """The training plan, as the checkpoint stores it."""
        with self._cond:
            return {"budget": self.budget, "budget_total": self.budget_total, "reason": self.reason,
                    "since": self.mix.since if self.mix else 0, "credited": self.credited}

    def restore_plan(self, documents: list[int], resumed: bool) -> None:
        """After a restart: the budget still owed as of the last checkpoint, plus the steps
        earned by every document stored since (`documents`: the token counts of the train
        stream's documents, in order; `resumed`: the trainer comes from a checkpoint). Each
        document earns again what it earned when it arrived (add_tokens rounds per document).

        A file reaches done/ only once its tokens are durably in the data store, so nothing a
        kill -9 interrupts can lose a file's budget: it is owed again from the store.
        """
        stored_tokens = sum(documents)
        plan = (self.trainer.checkpoint_extra or {}).get("plan")
        legacy = plan is None and self.legacy_plan_path.exists()
        if legacy:
            plan = self._read_legacy_plan()
        if plan is None and resumed:
            plan = {"budget": 0, "budget_total": 0}  # a checkpoint of a version without plans
        if plan is not None:
            try:
                budget, total = int(plan["budget"]), int(plan["budget_total"])
                since, reason = int(plan.get("since", 0)), str(plan.get("reason", ""))
                # A plan from before "credited" was kept had credited everything stored then.
                credited = int(plan.get("credited", stored_tokens))
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ignoring an unreadable training plan (%s): %s", self.checkpoint_path, e)
                budget = total = since = 0
                reason, credited = "", stored_tokens
            with self._cond:
                self.budget, self.budget_total, self.reason = budget, total, reason
                self.credited = min(credited, stored_tokens)
                if self.mix is not None:
                    self.mix.since = since
            if budget:
                log.info("resuming the training budget: %d of %d steps left", budget, total)
        owed = stored_tokens - self.credited
        if owed > 0:
            log.info("%d tokens were stored after the last checkpoint: their steps are owed", owed)
            start = 0
            for tokens in documents:
                if start + tokens > self.credited:
                    self.add_tokens(start + tokens - max(start, self.credited),
                                    since=max(start, self.credited))
                start += tokens

    def _read_legacy_plan(self) -> dict | None:
        try:
            plan = json.loads(self.legacy_plan_path.read_text())
            log.info("migrating the training plan from %s into the checkpoint", self.legacy_plan_path)
            return plan if isinstance(plan, dict) else None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", self.legacy_plan_path, e)
            return None

    # ---- called from other threads -------------------------------------------------------------

    @property
    def step(self) -> int:
        return self.trainer.step_num

    @property
    def model(self) -> Model:
        """The model being trained: for its configuration and size (inference_model() for its
        weights)."""
        return self.trainer.model

    def model_info(self) -> dict:
        m = self.trainer.model
        tok = m.tokenizer
        return {"parameters": m.num_params, "config": m.cfg.to_dict(),
                "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size} if tok else None,
                "step": self.trainer.step_num, "tokens_seen": self.trainer.tokens_seen}

    def steps_for(self, tokens: int) -> int:
        """Steps of one pass over `tokens` training tokens (at least 1)."""
        cfg = self.trainer.config
        return max(1, tokens // (cfg.batch_size * self.trainer.model.cfg.block_size))

    def inference_model(self) -> Model:
        """The latest published weights (a private copy: training never changes it)."""
        return self._snapshot

    def add_tokens(self, tokens: int, since: int = 0) -> int:
        """New training tokens arrived at offset `since` of the train stream: with auto-training
        on, extend the budget by auto_epochs passes over them. Returns the steps added."""
        with self._cond:
            self.credited = max(self.credited, since + tokens)
        if not self.settings.auto_train or tokens <= 0:
            return 0
        cfg = self.trainer.config
        rows = self.mix.fresh_rows(cfg.batch_size) if self.mix else cfg.batch_size
        steps = math.ceil(self.settings.auto_epochs * tokens / (rows * self.trainer.model.cfg.block_size))
        with self._cond:
            if self.budget == 0:
                self.budget_total = 0
                if self.mix is not None:
                    self.mix.since = since  # this budget learns everything from here on
            self.budget += steps
            self.budget_total += steps
            self.reason = self.reason if self.reason == "manual" else "auto"
            self._cond.notify_all()
        log.info("%d new tokens: %d training steps added (budget %d)", tokens, steps, self.budget)
        return steps

    def start(self, steps: int) -> dict:
        with self._cond:
            if self.mix is not None:
                self.mix.since = 0  # a manual run samples the whole store
            self.budget = self.budget_total = int(steps)
            self.reason = "manual"
            self._paused = False
            self._cond.notify_all()
        return self._after_command()

    def stop(self) -> dict:
        """Ends the current budget at the next step boundary (the daemon keeps serving)."""
        with self._cond:
            self.budget = 0
            self._cond.notify_all()
        return self._after_command()

    def pause(self) -> dict:
        with self._cond:
            self._paused = True
            self._cond.notify_all()
        return self._after_command()

    def resume(self) -> dict:
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        return self._after_command()

    def _target_state(self) -> str:
        """The state the training thread goes to at its next step boundary (under _cond)."""
        if self._paused:
            return "paused"
        return "running" if self.budget > 0 and self._has_data() else "idle"

    def _after_command(self) -> dict:
        """The status a command leads to: the training thread reaches it at its next step
        boundary, so its own ``state`` would still say what held before the command."""
        snap = self.status()
        with self._cond:
            if self.state not in ("stopping", "stopped"):
                snap["state"] = self._target_state()
        return snap

    def configure(self, changes: dict) -> dict:
        """Validated by the caller (the catalogue); applied at the next step boundary."""
        unknown = sorted(set(changes) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        trainer_changes = {k: v for k, v in changes.items() if k in TRAINER_KEYS}
        if trainer_changes:
            self.trainer.update_config(**trainer_changes)
        if "threads" in changes:
            self.trainer.set_threads(changes["threads"] or _usable_cores())
        for key in CONTROLLER_KEYS - {"threads"}:
            if key in changes:
                setattr(self.settings, key, changes[key])
        if self.mix is not None:
            self.mix.replay_fraction = self.settings.replay_fraction
        with self._cond:
            self._cond.notify_all()
        return self.config()

    def config(self) -> dict:
        """Every runtime setting, in catalogue order: train.config.set takes it back as it is."""
        cfg = self.trainer.config
        out = {}
        for key in CONFIG_KEYS:
            if key == "threads":
                out[key] = self.trainer.threads
            else:
                out[key] = getattr(cfg if key in TRAINER_KEYS else self.settings, key)
        return out

    def ask_checkpoint(self) -> None:
        """Asks the training thread for a checkpoint at the next step boundary (SIGUSR1)."""
        with self._cond:
            self._checkpoint_asked = True
            self._cond.notify_all()

    def request_checkpoint(self, timeout: float | None = None) -> bool:
        """Asks the training thread for a checkpoint at the next step boundary and waits for it."""
        done = threading.Event()
        with self._cond:
            self._checkpoint_waiters.append(done)
            self._cond.notify_all()
        return done.wait(timeout)

    def status(self) -> dict:
        snap = self.trainer.snapshot()
        with self._cond:
            state = self.state  # as the training thread last saw it: "paused" once no step runs
            budget, total, reason = self.budget, self.budget_total, self.reason
            # a step that has ended but is not charged yet: the budget it will leave
            budget = max(0, budget - max(0, snap.get("step", 0) - self._charged_step))
        eta = budget * self.step_seconds if budget and self.step_seconds else None
        snap.update({"state": state, "budget": budget, "budget_total": total, "reason": reason,
                     "step_seconds": self.step_seconds, "eta_s": eta,
                     "auto_train": self.settings.auto_train, "last_error": self.last_error,
                     "checkpoint": self.last_checkpoint})
        return snap

    # ---- the training thread -------------------------------------------------------------------

    def _checkpoint(self) -> None:
        t0 = time.perf_counter()
        # One file, one rename: weights, AdamW moments and the training plan together. A restart
        # resumes from it alone; model.cllm, written after it, is the model for everyone else.
        self.trainer.save_checkpoint(self.checkpoint_path, extra={"plan": self.plan()})
        self.legacy_plan_path.unlink(missing_ok=True)
        self.trainer.model.save(self.model_path, metadata={"step": self.trainer.step_num})
        self._last_checkpoint_step = self.trainer.step_num
        self._last_checkpoint_time = time.monotonic()
        self.last_checkpoint = {"step": self.trainer.step_num, "time": time.time()}
        seconds = time.perf_counter() - t0
        log.info("checkpoint at step %d written in %.2fs: %s", self.trainer.step_num, seconds, self.checkpoint_path)
        self.publish("checkpoint", {"kind": "checkpoint", "step": self.trainer.step_num,
                                    "path": str(self.checkpoint_path),
                                    "bytes": self.checkpoint_path.stat().st_size, "seconds": round(seconds, 3)})

    def _checkpoint_due(self) -> bool:
        s = self.settings
        steps = self.trainer.step_num - self._last_checkpoint_step
        if steps <= 0:
            return False
        if s.checkpoint_interval_steps and steps >= s.checkpoint_interval_steps:
            return True
        return bool(s.checkpoint_interval_seconds) and \
            time.monotonic() - self._last_checkpoint_time >= s.checkpoint_interval_seconds

    def _has_data(self) -> bool:
        return self.trainer.source.has_window(self.trainer.model.cfg.block_size, "train")

    def _publish_stats(self, force: bool = False) -> None:
        """From the training thread: state changes and idle ticks. While steps run, the daemon's
        main thread publishes instead (mid-step, so the spheres' live states show)."""
        now = time.monotonic()
        if force or now - self._last_publish >= self.settings.events_interval:
            self._last_publish = now
            self.publish("train", self.status())

    def run(self, stop: threading.Event, heartbeat: Callable[[], None] | None = None) -> None:
        beat = heartbeat or (lambda: None)
        try:
            while not stop.is_set():
                beat()
                with self._cond:
                    waiters, self._checkpoint_waiters = self._checkpoint_waiters, []
                    asked, self._checkpoint_asked = self._checkpoint_asked, False
                    can_train = self.budget > 0 and not self._paused
                if waiters or asked:
                    self._checkpoint_safely()
                    for w in waiters:
                        w.set()
                if not can_train or not self._has_data():
                    with self._cond:
                        self.state = self._target_state()
                        if self.state != "running":   # else a command came in just now
                            self._cond.wait(timeout=0.5)
                    self._publish_stats()
                    continue
                self.state = "running"
                self._train_one_step()
                with self._cond:
                    self.budget = max(0, self.budget - 1)
                    self._charged_step = self.trainer.step_num
                    finished = self.budget == 0
                if finished:
                    if self.mix is not None:
                        self.mix.since = 0
                    log.info("training budget done at step %d (loss %.4f)", self.trainer.step_num,
                             self.trainer.last.get("loss", float("nan")))
                    self._snapshot = self.trainer.model.copy()
                    self._checkpoint_safely()
                    self._publish_stats(force=True)
                elif self._checkpoint_due():
                    self._checkpoint_safely()
        finally:
            self.state = "stopping"
            # the final checkpoint of a graceful stop; a kill -9 loses only the steps since the last
            if self.trainer.step_num != self._last_checkpoint_step:
                self._checkpoint_safely()
            self.state = "stopped"
            for w in self._checkpoint_waiters:
                w.set()
            self.trainer.close()

    def _checkpoint_safely(self) -> None:
        # Whatever goes wrong (a full disk, a value msgpack cannot pack...), training goes on
        # and the previous checkpoint stays in place: a failed checkpoint never ends the thread.
        try:
            self._checkpoint()
        except Exception as e:
            self.last_error = f"checkpoint failed: {type(e).__name__}: {e}"
            if isinstance(e, OSError):
                log.error("%s", self.last_error)
            else:
                log.exception("%s", self.last_error)
            self.publish("error", {"source": "trainer", "message": self.last_error})

    def _train_one_step(self) -> None:
        tr = self.trainer
        t0 = time.perf_counter()
        r = tr.step()
        self.step_seconds = time.perf_counter() - t0 if not self.step_seconds else \
            0.9 * self.step_seconds + 0.1 * (time.perf_counter() - t0)
        cfg = tr.config
        if cfg.eval_interval and tr.step_num % cfg.eval_interval == 0 and \
                tr.source.has_window(tr.model.cfg.block_size, "val"):
            ev = tr.evaluate()
            log.info("step %d: loss %.4f, val loss %.4f", tr.step_num, r["loss"], ev["val_loss"])
        if tr.step_num % max(1, self.settings.snapshot_interval) == 0:
            self._snapshot = tr.model.copy()


def _usable_cores() -> int:
    from cllmd.trainer import usable_cores
    return usable_cores()
