"""The daemon's operations: what each protocol op does, on top of the running stages.

Arguments arrive validated against cllmd.protocol.OP_SPECS. The operations see the daemon only
through Stages, a narrow facade over the stages it wired; the exceptions they let through
become protocol error codes in one place, ERROR_CODES. Quick ops run on the socket thread;
anything that may take long (generation, checkpoints, saves) runs on the server's workers.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

from cllm.catalogue import check_section
from cllmd import __version__
from cllmd.batching import KVCacheFull
from cllmd.protocol import BAD_REQUEST, BUSY, NOT_FOUND, TOO_LARGE, PackedUints, ProtocolError
from cllmd.tokenizer import TokenizerError
from cllmd.models import ModelsError, NoSuchModel
from cllmd.queuedir import STATES, FileTooLarge, NotInQueue, QueueError

log = logging.getLogger(__name__)

# The exceptions an operation may let through, most specific first, and their protocol codes.
# Anything else is a bug: the server answers "internal" and logs it.
ERROR_CODES: tuple[tuple[type[Exception], str], ...] = (
    (FileTooLarge, TOO_LARGE),
    (KVCacheFull, BUSY),
    (NotInQueue, NOT_FOUND),
    (NoSuchModel, NOT_FOUND),
    (ModelsError, BAD_REQUEST),
    (QueueError, BAD_REQUEST),
    (TokenizerError, BAD_REQUEST),
    (ValueError, BAD_REQUEST),    # a value the specs cannot judge alone (SamplingOptions, configure)
)


# tokenize encodes this many characters at a time: a chunk's ids (256 KiB of int32) come from
# malloc's heap, reused chunk after chunk, where 1 Mi characters' (4 MiB, over heap.py's mmap
# threshold) were a fresh mapping each, faulted in with the GIL held: a 16 MiB text of the bytes
# tokenizer took 28-45 ms, its longest chunk 2-7 ms, against 8.5 and 0.17 ms now.
TOKENIZE_CHARS = 1 << 16


@contextlib.contextmanager
def protocol_errors():
    """Turns the exceptions of ERROR_CODES into ProtocolError(code, message)."""
    try:
        yield
    except ProtocolError:
        raise
    except Exception as e:
        for kind, code in ERROR_CODES:
            if isinstance(e, kind):
                raise ProtocolError(code, str(e)) from None
        raise


@dataclass
class Stages:
    """What the operations may use of the running daemon: the stages it wired, by their public
    methods, and the few figures the daemon keeps for them."""
    controller: Any        # cllmd.controller.TrainingController
    queue: Any             # cllmd.queuedir.QueueDir
    store: Any             # cllmd.datastore.DataStore
    server: Any            # cllmd.server.Server (pool statistics)
    batcher: Any           # cllmd.batching.Batcher (the generations decoded together)
    tokenizer: Any         # the model's tokenizer
    model_path: Path
    queue_dir: Path
    started: float         # time.time() at start
    request_stop: Callable[[], None]
    queue_current: Callable[[], str | None]   # the file being ingested
    queue_progress: Callable[[], dict | None] = lambda: None   # how far into it (QueueWatcher.progress)
    generation_tokens_per_second: float = 0.0  # of the last finished generation
    json_fields: tuple[str, ...] = ("text", "content", "body")   # queue.json_fields, for queue.show
    models: Any = None                         # cllmd.models.Models
    active_model: str = "default"              # the name of the model training and serving
    make_default_model: Callable[[], Any] | None = None  # a fresh default Model (model.create from "default")
    switch_model: Callable[[str], dict] | None = None    # model.use: the daemon's live switch
    train_on_existing: Callable[[], int] | None = None   # model.use's train_on_existing


class Api:
    def __init__(self, stages: Stages):
        self.s = stages
        self.process = psutil.Process()  # one object: cpu_percent measures since its last call
        self._loaded = None  # (key, Model) of the last model generate loaded by name

    def register(self, server) -> None:
        # on the socket thread: only what reads the daemon's memory (a ping waits behind them)
        quick = ["train.start", "train.stop", "train.pause", "train.resume", "train.status",
                 "train.config.get", "model.info", "shutdown"]
        for op in quick:
            server.register(op, self._handler(op))
        server.add_pool("control", workers=1, max_pending=32)  # generations never starve these
        # each writes a file durably (fsync): never on the socket thread
        for op in ("queue.add", "queue.retry", "train.config.set", "model.save", "checkpoint", "model.create",
                   "model.rm", "model.use"):
            server.register(op, self._handler(op), blocking=True, pool="control")
        # each reads the disk or /proc, in proportion to the queue or the models: queue.list of
        # 1,000 files took 100-290 ms on the socket thread under issue 11's attack (its lstats and
        # reason files, each giving the GIL up and waiting to take it back), status 10-20 ms
        server.add_pool("reads", workers=1, max_pending=32)
        for op in ("status", "stats", "queue.list", "models.list", "model.show"):
            server.register(op, self._handler(op), blocking=True, pool="reads")
        # a 16 MiB text takes seconds to tokenize: never on the socket thread, one at a time
        server.add_pool("tokens", workers=1, max_pending=4)
        for op in ("tokenize", "detokenize", "queue.show"):   # queue.show preprocesses a file
            server.register(op, self._handler(op), blocking=True, pool="tokens")
        server.register("generate", self.generate, stream=True)

    def _handler(self, op: str):
        method = getattr(self, op.replace(".", "_"))

        def handle(req, ctx):
            with protocol_errors():
                return method(req.args)
        return handle

    # ---- status --------------------------------------------------------------------------------

    def _daemon(self) -> dict:
        proc = self.process
        return {"version": __version__, "pid": os.getpid(), "uptime_s": round(time.time() - self.s.started, 1),
                "cpu_percent": proc.cpu_percent(None), "rss_bytes": proc.memory_info().rss}

    def _model(self) -> dict:
        m = self.s.controller.model
        return {"name": self.s.active_model, "parameters": m.num_params, "context": m.cfg.block_size,
                "vocab_size": m.cfg.vocab_size}

    def _queue(self) -> dict:
        return {**self.s.queue.counts(), "current": self.s.queue_current(),
                "progress": self.s.queue_progress(), "dir": str(self.s.queue_dir)}

    def _serving(self) -> dict:
        pools = self.s.server.pool_stats().get("default", {})
        return {"running": pools.get("running", 0), "waiting": pools.get("waiting", 0),
                "tokens_per_second": self.s.generation_tokens_per_second, "batch": self.s.batcher.status()}

    def status(self, args) -> dict:
        snap = self.s.controller.status()
        train = {k: snap.get(k) for k in ("state", "step", "tokens_seen", "loss", "val_loss", "perplexity", "lr",
                                           "tokens_per_second", "auto_train", "budget", "eta_s")}
        if train["perplexity"] is None and isinstance(train["loss"], float):
            train["perplexity"] = math.exp(min(train["loss"], 700.0))
        return {"daemon": self._daemon(), "model": self._model(), "train": train, "queue": self._queue(),
                "serving": self._serving(), "store": self.s.store.stats()}

    def stats(self, args) -> dict:
        return {"daemon": self._daemon(), "model": self._model(), "queue": self._queue(),
                "serving": self._serving(), "train": self.s.controller.status()}

    # ---- tokens ----------------------------------------------------------------------------------

    def tokenize(self, args) -> dict:
        # the reply built a chunk of text at a time, straight into msgpack bytes: the ids of a
        # 15 MiB text as one int32 array would be 60 MiB, their packed reply 15-30 MiB
        limit = self.s.server.max_message_bytes
        ids, count, packed = PackedUints(), 0, 0
        for chunk in self.s.tokenizer.encode_chunks(args["text"], TOKENIZE_CHARS):
            count += len(chunk)
            if packed + 64 <= limit:
                ids.extend(chunk)
                packed = ids.nbytes
            else:   # over: only counted, for the message (a msgpack uint takes 1, 2, 3 or 5 bytes)
                packed += len(chunk) + int((chunk > 127).sum() + (chunk > 255).sum() + 2 * (chunk > 65535).sum())
        if packed + 64 > limit:
            raise ProtocolError(TOO_LARGE, f"{count} token ids take {packed} bytes, over the reply limit "
                                           f"of {limit} bytes; tokenize the text in parts")
        return {"count": count, "ids": ids}

    def detokenize(self, args) -> dict:
        return {"text": self.s.tokenizer.decode(args["ids"])}

    # ---- training --------------------------------------------------------------------------------

    def train_start(self, args) -> dict:
        steps = args.get("steps")
        if steps is None:  # one pass over the training tokens
            steps = self.s.controller.steps_for(self.s.store.num_tokens("train"))
        return self.s.controller.start(steps)

    def train_stop(self, args) -> dict:
        return self.s.controller.stop()

    def train_pause(self, args) -> dict:
        return self.s.controller.pause()

    def train_resume(self, args) -> dict:
        return self.s.controller.resume()

    def train_status(self, args) -> dict:
        return self.s.controller.status()

    def train_config_get(self, args) -> dict:
        return self.s.controller.config()

    def train_config_set(self, args) -> dict:
        changes = {k: v for k, v in args.items() if v is not None}
        if not changes:
            raise ProtocolError(BAD_REQUEST, "nothing to set: give at least one setting")
        problem = check_section("train", {**self.s.controller.config(), **changes})
        if problem:  # the values are checked one by one already: a rule across them (min_lr <= lr)
            raise ProtocolError(BAD_REQUEST, f"train.config.set: {problem}")
        # kept with the active model (its settings.json), so they hold across restarts and switches
        self.s.models.record_settings(self.s.active_model, changes)
        config = self.s.controller.configure(changes)
        return {"config": config, "applies_at_step": self.s.controller.step + 1}

    # ---- the queue -------------------------------------------------------------------------------

    def queue_list(self, args) -> dict:
        limit = args.get("limit") or 1000
        state = args.get("state")
        listing = self.s.queue.list(limit, [state] if state else STATES)
        files = []
        for st in ("incoming", "processing", "done", "failed"):
            if state and st != state:
                continue
            for f in listing.get(st, []):
                reason = None
                if st == "failed" and f.get("reason") is not None:
                    reason = {"reason": f.get("reason"), "attempts": f.get("attempts"), "time": f.get("time")}
                files.append({"name": f["name"], "state": st, "bytes": f.get("size"), "mtime": f.get("mtime"),
                              "reason": reason})
        files.sort(key=lambda f: f["mtime"] or 0, reverse=True)  # the newest first
        counts = self.s.queue.counts()
        listed = sum(counts[st] for st in ([state] if state else STATES))
        return {"counts": counts, "files": files[:limit], "truncated": listed > limit,
                "dir": str(self.s.queue_dir)}

    def queue_add(self, args) -> dict:
        data = bytes(args["data"])
        name = self.s.queue.add(args["name"], data)
        return {"name": name, "bytes": len(data)}

    def queue_show(self, args) -> dict:
        """What a queued file becomes: its preprocessed text, as the queue would ingest it now."""
        from cllmd.preprocess import PreprocessError, preprocess_file
        name, q = args["name"], self.s.queue
        for state in ("incoming", "processing", "done", "failed"):
            path = q.dirs[state] / name
            if os.path.isfile(path) and not os.path.islink(path):
                break
        else:
            raise NotInQueue(f"no file {name!r} in the queue")
        limit = args["max_chars"]
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > q.max_file_bytes:
                    raise PreprocessError(f"too large: over the queue's limit of {q.max_file_bytes} bytes")
                pre = preprocess_file(name, f, json_fields=self.s.json_fields, max_bytes=q.max_file_bytes)
                text = pre.head(limit)
        except PreprocessError as e:
            return {"name": name, "state": state, "error": str(e)}
        except OSError as e:
            return {"name": name, "state": state, "error": f"cannot read: {e.strerror or e}"}
        return {"name": name, "state": state, "format": pre.format, "source": pre.source,
                "chars": pre.chars, "text": text, "truncated": pre.chars > limit}

    def queue_retry(self, args) -> dict:
        return {"name": self.s.queue.retry(args["name"])}

    # ---- the model -------------------------------------------------------------------------------

    def model_info(self, args) -> dict:
        info = self.s.controller.model_info()
        info["config"]["context"] = info["config"]["block_size"]
        return {"name": self.s.active_model, "path": str(self.s.model_path), **info}

    def _write(self, path) -> dict:
        t0 = time.perf_counter()
        if not self.s.controller.request_checkpoint(timeout=120):
            raise ProtocolError("unavailable", "the trainer did not reach a step boundary within 120 s")
        return {"path": str(path), "bytes": path.stat().st_size, "step": self.s.controller.step,
                "seconds": round(time.perf_counter() - t0, 3)}

    def model_save(self, args) -> dict:
        return self._write(self.s.model_path)

    def checkpoint(self, args) -> dict:
        return self._write(self.s.controller.checkpoint_path)

    # ---- named models ------------------------------------------------------------------------------

    def _live(self, info: dict) -> dict:
        # the active model's step moves on between checkpoints: the trainer's own figures
        if info["name"] == self.s.active_model:
            info.update(step=self.s.controller.step, tokens_seen=self.s.controller.status().get("tokens_seen", 0))
        return info

    def models_list(self, args) -> dict:
        return {"active": self.s.active_model, "models": [self._live(m) for m in self.s.models.list()]}

    def model_show(self, args) -> dict:
        return self._live(self.s.models.info(args["name"]))

    def model_create(self, args) -> dict:
        return self.s.models.create(args["name"], args["from"], self.s.make_default_model)

    def model_use(self, args) -> dict:
        info = self.s.switch_model(args["name"])
        if args.get("train_on_existing"):
            info["retokenizing"] = self.s.train_on_existing()
        return info

    def model_rm(self, args) -> dict:
        if args["name"] == self.s.active_model:  # the file may say otherwise until a restart
            raise ProtocolError(BAD_REQUEST, f"{args['name']!r} is the active model: switch to another one first")
        return self.s.models.remove(args["name"])

    def shutdown(self, args) -> dict:
        log.info("shutdown requested by a client")
        self.s.request_stop()
        return {"stopping": True}

    # ---- generation --------------------------------------------------------------------------------

    def _generation_model(self, name: str | None):
        """The active model's published weights, or another named model's newest file, loaded
        once and kept until that file changes (a generation holds the model it started with)."""
        if name is None or name == self.s.active_model:
            return self.s.controller.inference_model()
        from cllmd.model import Model
        d = self.s.models.dir(name)
        path = d.checkpoint if d.checkpoint.is_file() else d.model
        key = (name, path, path.stat().st_mtime_ns)
        cached = self._loaded
        if cached is None or cached[0] != key:
            cached = self._loaded = (key, Model.load(path))
        return cached[1]

    def generate(self, req, ctx):
        """Streams token events; returns the done statistics. Runs on a server worker thread."""
        from cllmd.generate import SamplingOptions, Sequence
        with protocol_errors():  # bad options, no room; errors while generating are the server's
            model = self._generation_model(req.args.get("model"))
            opts = SamplingOptions.from_args(req.args, model.metadata.get("generation_defaults"))
            seq = Sequence(model, req.args["prompt"], opts, cancel=ctx.cancelled)
            stream = self.s.batcher.submit(seq)  # decoded with the others from the next step on
        for piece in stream:  # the server collects the pieces itself for stream: false
            yield {"text": piece}
        self.s.generation_tokens_per_second = stream.stats.tokens_per_second
        return stream.stats.to_dict()
