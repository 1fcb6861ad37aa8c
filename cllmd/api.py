"""The daemon's operations: what each protocol op does, on top of the running stages.

Arguments arrive validated against cllmd.protocol.OP_SPECS; failures are raised as
ProtocolError(code, message) and become error replies. Quick ops run on the socket thread;
anything that may take long (generation, checkpoints, saves) runs on the server's workers.
"""
from __future__ import annotations

import logging
import math
import os
import time

import psutil

from cllm.catalogue import check_section
from cllmd import __version__
from cllmd.protocol import ProtocolError

log = logging.getLogger(__name__)


class Api:
    def __init__(self, daemon):
        self.d = daemon
        self.process = psutil.Process()  # one object: cpu_percent measures since its last call

    def register(self, server) -> None:
        quick = ["status", "stats", "train.start", "train.stop", "train.pause",
                 "train.resume", "train.status", "train.config.get", "train.config.set", "queue.list",
                 "queue.retry", "model.info", "shutdown"]
        for op in quick:
            server.register(op, self._handler(op))
        server.add_pool("control", workers=1, max_pending=32)  # generations never starve these
        for op in ("queue.add", "model.save", "checkpoint"):
            server.register(op, self._handler(op), blocking=True, pool="control")
        # a 16 MiB text takes seconds to tokenize: never on the socket thread, one at a time
        server.add_pool("tokens", workers=1, max_pending=4)
        for op in ("tokenize", "detokenize"):
            server.register(op, self._handler(op), blocking=True, pool="tokens")
        server.register("generate", self.generate, stream=True)

    def _handler(self, op: str):
        method = getattr(self, op.replace(".", "_"))
        return lambda req, ctx: method(req.args)

    # ---- status --------------------------------------------------------------------------------

    def _daemon(self) -> dict:
        proc = self.process
        return {"version": __version__, "pid": os.getpid(), "uptime_s": round(time.time() - self.d.started, 1),
                "cpu_percent": proc.cpu_percent(None), "rss_bytes": proc.memory_info().rss}

    def _model(self) -> dict:
        m = self.d.controller.trainer.model
        return {"name": self.d.dirs.model.name, "parameters": m.num_params, "context": m.cfg.block_size,
                "vocab_size": m.cfg.vocab_size}

    def _queue(self) -> dict:
        return {**self.d.queue.counts(), "current": self.d.queue_current, "dir": str(self.d.dirs.queue)}

    def _serving(self) -> dict:
        pools = self.d.server.pool_stats().get("default", {})
        return {"running": pools.get("running", 0), "waiting": pools.get("waiting", 0),
                "tokens_per_second": self.d.generation_tokens_per_second}

    def status(self, args) -> dict:
        snap = self.d.controller.status()
        train = {k: snap.get(k) for k in ("state", "step", "tokens_seen", "loss", "val_loss", "perplexity", "lr",
                                           "tokens_per_second", "auto_train", "budget", "eta_s")}
        if train["perplexity"] is None and isinstance(train["loss"], float):
            train["perplexity"] = math.exp(min(train["loss"], 700.0))
        return {"daemon": self._daemon(), "model": self._model(), "train": train, "queue": self._queue(),
                "serving": self._serving(), "store": self.d.store.stats()}

    def stats(self, args) -> dict:
        return {"daemon": self._daemon(), "model": self._model(), "queue": self._queue(),
                "serving": self._serving(), "train": self.d.controller.status()}

    # ---- tokens ----------------------------------------------------------------------------------

    def tokenize(self, args) -> dict:
        from cllmd.tokenizer import TokenizerError
        try:
            ids = self.d.model_tokenizer.encode(args["text"])
        except TokenizerError as e:
            raise ProtocolError("bad_request", str(e)) from None
        # the reply's size, known before anything is built: a msgpack uint takes 1, 2, 3 or 5 bytes
        packed = len(ids) + int((ids > 127).sum() + (ids > 255).sum() + 2 * (ids > 65535).sum())
        limit = self.d.server.max_message_bytes
        if packed + 64 > limit:
            raise ProtocolError("too_large", f"{len(ids)} token ids take {packed} bytes, over the reply limit "
                                             f"of {limit} bytes; tokenize the text in parts")
        return {"count": len(ids), "ids": ids}  # the codec packs the array a chunk at a time

    def detokenize(self, args) -> dict:
        from cllmd.tokenizer import TokenizerError
        try:
            return {"text": self.d.model_tokenizer.decode(args["ids"])}
        except TokenizerError as e:
            raise ProtocolError("bad_request", str(e)) from None

    # ---- training --------------------------------------------------------------------------------

    def train_start(self, args) -> dict:
        steps = args.get("steps")
        if steps is None:  # one pass over the training tokens
            c = self.d.controller.trainer
            steps = max(1, self.d.store.num_tokens("train") // (c.config.batch_size * c.model.cfg.block_size))
        return self.d.controller.start(steps)

    def train_stop(self, args) -> dict:
        return self.d.controller.stop()

    def train_pause(self, args) -> dict:
        return self.d.controller.pause()

    def train_resume(self, args) -> dict:
        return self.d.controller.resume()

    def train_status(self, args) -> dict:
        return self.d.controller.status()

    def train_config_get(self, args) -> dict:
        return self.d.controller.config()

    def train_config_set(self, args) -> dict:
        changes = {k: v for k, v in args.items() if v is not None}
        if not changes:
            raise ProtocolError("bad_request", "nothing to set: give at least one setting")
        problem = check_section("train", {**self.d.controller.config(), **changes})
        if problem:  # the values are checked one by one already: a rule across them (min_lr <= lr)
            raise ProtocolError("bad_request", f"train.config.set: {problem}")
        try:
            config = self.d.controller.configure(changes)
        except ValueError as e:
            raise ProtocolError("bad_request", str(e)) from None
        return {"config": config, "applies_at_step": self.d.controller.trainer.step_num + 1}

    # ---- the queue -------------------------------------------------------------------------------

    def queue_list(self, args) -> dict:
        limit = args.get("limit") or 1000
        listing = self.d.queue.list()
        state = args.get("state")
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
        return {"counts": self.d.queue.counts(), "files": files[:limit], "truncated": len(files) > limit,
                "dir": str(self.d.dirs.queue)}

    def queue_add(self, args) -> dict:
        from cllmd.trainqueue import FileTooLarge, QueueError
        data = bytes(args["data"])
        try:
            name = self.d.queue.add(args["name"], data)
        except FileTooLarge as e:
            raise ProtocolError("too_large", str(e)) from None
        except (QueueError, ValueError) as e:
            raise ProtocolError("bad_request", str(e)) from None
        return {"name": name, "bytes": len(data)}

    def queue_retry(self, args) -> dict:
        from cllmd.trainqueue import NotInQueue
        try:
            name = self.d.queue.retry(args["name"])
        except NotInQueue as e:
            raise ProtocolError("not_found", str(e)) from None
        return {"name": name}

    # ---- the model -------------------------------------------------------------------------------

    def model_info(self, args) -> dict:
        tr = self.d.controller.trainer
        m = tr.model
        config = m.cfg.to_dict()
        config["context"] = config["block_size"]
        tok = m.tokenizer
        return {"name": self.d.dirs.model.name, "path": str(self.d.dirs.model), "parameters": m.num_params,
                "config": config, "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size} if tok else None,
                "step": tr.step_num, "tokens_seen": tr.tokens_seen}

    def _write(self, path) -> dict:
        t0 = time.perf_counter()
        if not self.d.controller.request_checkpoint(timeout=120):
            raise ProtocolError("unavailable", "the trainer did not reach a step boundary within 120 s")
        return {"path": str(path), "bytes": path.stat().st_size, "step": self.d.controller.trainer.step_num,
                "seconds": round(time.perf_counter() - t0, 3)}

    def model_save(self, args) -> dict:
        return self._write(self.d.dirs.model)

    def checkpoint(self, args) -> dict:
        return self._write(self.d.controller.checkpoint_path)

    def shutdown(self, args) -> dict:
        log.info("shutdown requested by a client")
        self.d.request_stop()
        return {"stopping": True}

    # ---- generation --------------------------------------------------------------------------------

    def generate(self, req, ctx):
        """Streams token events; returns the done statistics. Runs on a server worker thread."""
        from cllmd.generate import Generation, SamplingOptions
        a = req.args
        try:
            opts = SamplingOptions.from_args(a)
            gen = Generation(self.d.controller.inference_model(), a["prompt"], opts, cancel=ctx.cancelled)
        except ValueError as e:
            raise ProtocolError("bad_request", str(e)) from None
        for piece in gen:  # the server collects the pieces itself for stream: false
            yield {"text": piece}
        self.d.generation_tokens_per_second = gen.stats.tokens_per_second
        return gen.stats.to_dict()
