"""cllmd serve: wires the stages together and supervises them from the main thread.

The main thread only supervises: signals go onto a queue it drains (TERM and INT stop, HUP
reloads the configuration, USR1 checkpoints), it checks every worker's heartbeat and pings the
systemd watchdog only while all are fresh. Training, the queue watcher and the socket loop each
run on their own thread with a stop event and a heartbeat.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import queue as stdlib_queue
import signal
import sys
import threading
import time
from pathlib import Path

from cllmd import __version__, sdnotify
from cllm.durable import sweep_temps
from cllmd.heap import return_large_blocks
from cllmd.lockfile import AlreadyRunning, StateLock
from cllmd.paths import Dirs, PathsError
from cllmd.settings import SettingsError, add_arguments, load_settings, overrides_from_args

log = logging.getLogger("cllmd.daemon")

# A worker silent for 3 watchdog intervals (90 s under the unit's WatchdogSec=60), at least this
# long, stops the watchdog pings: systemd then restarts the daemon.
STALE_HEARTBEAT_SECONDS = 5.0
SWITCH_INTERVAL = 5e-5           # see Daemon.start


class Heartbeats:
    """Last beat per worker; the supervisor reads them."""

    def __init__(self):
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()

    def beater(self, name: str):
        def beat() -> None:
            with self._lock:
                self._beats[name] = time.monotonic()
        beat()
        return beat

    def stale(self, limit: float) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [n for n, t in self._beats.items() if now - t > limit]


class _EventLogHandler(logging.Handler):
    """Warnings and errors also go to subscribers as "log" events."""

    def __init__(self, server):
        super().__init__(level=logging.WARNING)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.server.publish("log", {"level": record.levelname.lower(), "logger": record.name,
                                        "message": record.getMessage()})
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class Daemon:
    def __init__(self, dirs: Dirs, settings, config_overrides: dict):
        self.dirs = dirs
        self.settings = settings
        self.config_overrides = config_overrides
        self.stop_event = threading.Event()
        self.signals: stdlib_queue.SimpleQueue = stdlib_queue.SimpleQueue()
        self.heartbeats = Heartbeats()
        self.threads: list[threading.Thread] = []
        self.started = time.time()
        self.queue_current: str | None = None      # the file being ingested
        self.switch_lock = threading.RLock()       # a model switch waits for the file being ingested

    # ---- building the stages -------------------------------------------------------------------

    def _create_default_model(self, queue_add):
        """First start: a BPE tokenizer and a model sized to learn within minutes; the default
        corpus goes into the queue so a new user watches it learn."""
        from cllmd.corpus import ensure_default_corpus
        from cllmd.model import Model, ModelConfig
        from cllmd.tokenizer import BytesTokenizer, train_bpe
        ms = self.settings.model
        log.info("no model yet: creating the default model (building the default corpus first)")
        corpus = ensure_default_corpus(self.dirs.cache)
        tokenizer = BytesTokenizer() if ms.tokenizer == "bytes" else train_bpe(corpus, ms.vocab_size)
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=ms.n_layer, n_head=ms.n_head,
                          n_embd=ms.n_embd, block_size=ms.block_size, init=ms.init,
                          clock_positions=ms.clock_positions)
        model = Model(cfg, seed=self.settings.train.seed, tokenizer=tokenizer,
                      metadata={"created": time.time(), "created_by": f"cllmd {__version__}"})
        return model, corpus

    def _settings_for(self, md, settings=None):
        """The settings (self.settings, or `settings`) as they apply to the model in md: its own
        train settings (settings.json, cllm.catalogue.MODEL_SETTINGS) over the configuration
        file's, the command line over both. ModelsError naming the file and what is wrong."""
        from cllmd.models import ModelsError
        settings = settings or self.settings
        own = {f"train.{k}": v for k, v in self.models.own_settings(md).items()
               if f"train.{k}" not in self.config_overrides}
        try:
            return settings.replace(own, origin=str(md.settings)) if own else settings
        except SettingsError as e:  # a rule across the two: the file's min_lr over the model's lr
            raise ModelsError(str(e)) from None

    def _train_config(self, settings, base=None):
        """TrainConfig from the settings of the catalogue that apply to the trainer; over a
        checkpoint's config (base), all but the seed, which only counts at the start."""
        from cllm.catalogue import SETTINGS
        from cllmd.trainer import TrainConfig
        values = {s.name: settings.get(s.key) for s in SETTINGS.values() if s.applies == "trainer"}
        if base is None:
            return TrainConfig(**values)
        import dataclasses
        return dataclasses.replace(base, **{k: v for k, v in values.items() if k != "seed"})

    def _controller_settings(self, settings):
        import dataclasses

        from cllmd.controller import ControllerSettings
        t = settings.train
        values = {f.name: getattr(t, f.name) for f in dataclasses.fields(ControllerSettings)
                  if f.name != "events_interval"}
        return ControllerSettings(**values, events_interval=settings.server.events_interval)

    def _starting(self, what: str) -> None:
        """Say what start-up is doing: to clients (ping, and every other op's `unavailable`),
        to systemd (STATUS=) and, when the phase changes, in the log."""
        self.server.starting = what
        sdnotify.status(f"starting: {what}")
        phase = what.partition(":")[0]
        if phase != self._start_phase:
            self._start_phase = phase
            log.info("starting: %s", what)

    def start(self) -> None:
        from cllmd.server import Server

        s = self.settings
        # The sockets first, so that clients see "starting" (and what it is doing) rather than
        # "not running" while the model loads and the kernels compile.
        self.server = Server(self.dirs.socket_endpoint, self.dirs.events_endpoint,
                             max_message_bytes=s.server.max_message_bytes, workers=s.server.generate_workers,
                             max_pending=s.server.max_pending_generations,
                             client_timeout=s.server.stream_timeout, **self._tcp_options())
        self._start_phase = None
        self._starting("loading the model")
        logging.getLogger().addHandler(_EventLogHandler(self.server))
        self._spawn("server", self.server.serve)
        try:
            self._start_stages()
        except BaseException:
            self.stop_event.set()
            self.server.close()
            raise

    def _start_stages(self) -> None:
        s = self.settings

        from cllmd.api import Api, Stages
        from cllmd.batching import Batcher
        from cllmd.models import Models
        from cllmd.queuedir import QueueDir
        from cllmd.retry import RetryPolicy
        from cllmd.watcher import QueueWatcher
        from cllmd.warmup import warm_up

        # Generation workers and the socket loop share the GIL with node zero while it trains.
        # With Python's default 5 ms switch interval a generation thread coming back from a
        # kernel waits behind it: bench_daemon.py --bpe measured 727 generated tokens/s while
        # training without this setting against 1,386 with it (ping p99 3.1 vs 2.8 ms). The
        # trainer's own throughput no longer depends on it (one nogil kernel per sphere).
        sys.setswitchinterval(SWITCH_INTERVAL)
        # the state lock is held: finish what a crash left, move a state of before named models
        self.models = Models(self.dirs)
        self.models.sweep()
        self._sweep_crash_leftovers()
        self.models.migrate()
        self.active_model = self.models.active()
        md = self.dirs.model_dir(self.active_model)
        self.store, trainer, corpus = self._open_model(md)
        self.model_tokenizer = trainer.model.tokenizer

        self.controller = self._make_controller(trainer, md, self.store)
        self.queue = QueueDir(self.dirs.queue, max_file_bytes=s.queue.max_file_bytes,
                              on_event=self._queue_event)
        self.watcher = QueueWatcher(self.queue, self._ingest, retry=RetryPolicy(s.queue.max_attempts),
                                    rescan_seconds=s.queue.rescan_seconds, json_fields=s.queue.json_fields,
                                    furniture_path=self.dirs.furniture)
        if corpus is not None:
            # queue first, model file second: a crash in between re-creates the same model and
            # the store's sha256 dedup keeps the corpus from being stored twice
            for path in corpus:
                self.queue.add(f"default-corpus-{path.name}", path.read_bytes())
            trainer.model.save(md.model)
        from cllmd.generate import weights_problem
        problem = weights_problem(s.inference.weights)
        if problem:
            raise SettingsError(f"inference.weights = {s.inference.weights!r}: {problem}")
        self.batcher = Batcher(s.inference.weights, s.inference.kv_cache_bytes)
        self.api = Api(Stages(controller=self.controller, queue=self.queue, store=self.store, server=self.server,
                              batcher=self.batcher,
                              tokenizer=self.model_tokenizer, model_path=md.model, queue_dir=self.dirs.queue,
                              started=self.started, request_stop=self.request_stop,
                              queue_current=lambda: self.queue_current,
                              queue_progress=lambda: self.watcher.progress, json_fields=tuple(s.queue.json_fields),
                              models=self.models, active_model=self.active_model,
                              make_default_model=lambda: self._create_default_model(None)[0],
                              switch_model=self.switch_model, train_on_existing=self.train_on_existing))
        self.api.register(self.server)
        # every kernel compiled (or loaded from the cache) before the first step or generation
        warm_up(trainer.model.cfg, dataclasses.replace(trainer.config, precision=trainer.precision),
                self._starting, weights=s.inference.weights)
        # What start-up built (modules, numba's compiled kernels, the tokenizer: ~10^5 objects)
        # lives as long as the daemon: out of the collector's reach, a full collection no longer
        # walks it while holding the GIL (measured 50-70 ms each, stalling every thread).
        gc.collect()
        gc.freeze()
        self.server.starting = None
        self._spawn("queue", self.watcher.run)
        self._start_trainer()
        self._spawn("batcher", self.batcher.run)
        sdnotify.ready()
        sdnotify.status(self.status_line())
        log.info("cllmd %s serving on %s (events %s); model %.2fM parameters, step %d; %d thread(s)",
                 __version__, self.dirs.socket, self.dirs.events_socket, trainer.model.num_params / 1e6,
                 trainer.step_num, trainer.pool.size)

    def _open_model(self, md):
        """(data store, trainer, corpus) of the named model in md: resumed from its checkpoint,
        else loaded from its model file, else a fresh default model (corpus: the files to queue
        for it, None otherwise)."""
        from cllmd.datastore import DataStore
        from cllmd.model import Model
        from cllmd.modelfile import read_model_file
        from cllmd.launch import trainer_class
        from cllmd.tokensource import ReplayMix
        from cllmd.trainer import usable_cores
        Trainer = trainer_class()  # the DistributedTrainer under mpirun (docs/distributed.md)
        md.ensure()
        s = self._settings_for(md)
        checkpoint = md.checkpoint
        threads = s.train.threads or usable_cores()
        corpus = None
        if checkpoint.exists() or md.model.exists():
            header, _ = read_model_file(checkpoint if checkpoint.exists() else md.model, verify=False)
            vocab = header["config"]["vocab_size"]
        else:
            self._starting("creating the default model (first start only): building its corpus and tokenizer")
            model, corpus = self._create_default_model(None)
            vocab = model.cfg.vocab_size
        store = DataStore(md.data, vocab_size=vocab)
        source = ReplayMix(store, s.train.replay_fraction)
        if checkpoint.exists():
            trainer = Trainer.from_checkpoint(checkpoint, source, threads=threads)
            trainer.update_config(**{k: v for k, v in vars(self._train_config(s, trainer.config)).items()})
            log.info("resumed from %s at step %d", checkpoint, trainer.step_num)
        else:
            if corpus is None:
                model = Model.load(md.model)
                log.info("loaded %s", md.model)
            trainer = Trainer(model, source, self._train_config(s), threads=threads)
        return store, trainer, corpus

    def _make_controller(self, trainer, md, store):
        from cllmd.controller import TrainingController
        controller = TrainingController(trainer, checkpoint_path=md.checkpoint, model_path=md.model,
                                        settings=self._controller_settings(self._settings_for(md)),
                                        publish=self.server.publish)
        controller.restore_plan([doc.tokens for doc in store.documents("train")],
                                resumed=md.checkpoint.exists())
        return controller

    def _start_trainer(self) -> None:
        """The active model's training thread, with a stop event of its own (a switch stops it)."""
        self.trainer_stop = stop = threading.Event()
        controller = self.controller
        self._spawn("trainer", lambda _daemon_stop, beat: controller.run(stop, beat))
        self.trainer_thread = self.threads[-1]

    def train_on_existing(self) -> int:
        """Tokenize every text already ingested (the files in queue/done/) into the active
        model's store with its own tokenizer, on a thread of its own; returns the file count.
        The store's sha256 dedup skips what the model has already."""
        from cllmd.preprocess import PreprocessError, RepeatedLines, preprocess_file
        done = self.dirs.queue / "done"
        names = sorted(p.name for p in done.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if done.is_dir() else []
        q = self.settings.queue

        def run() -> None:
            repeats, stored = RepeatedLines(), 0
            for name in names:
                if self.stop_event.is_set():
                    return
                try:
                    with open(done / name, "rb") as f:
                        pre = preprocess_file(name, f, json_fields=q.json_fields,
                                              max_bytes=q.max_file_bytes, repeats=repeats)
                        stored += not self._ingest(pre, pre.sha256)["duplicate"]
                except (OSError, PreprocessError, ValueError, RuntimeError) as e:
                    log.warning("train on existing: %s skipped: %s", name, e)
            log.info("train on existing: %d of %d ingested texts tokenized for %r", stored, len(names),
                     self.active_model)

        threading.Thread(target=run, name="retokenize", daemon=True).start()
        return len(names)

    def switch_model(self, name: str) -> dict:
        """Make `name` the active model, live: the old one finishes its step and checkpoints,
        then the queue and training follow the new one; generations already running keep the
        old weights (each holds its own snapshot) and finish on them."""
        with self.switch_lock:
            if name == self.active_model:
                return self.models.info(name)
            md = self.models.dir(name)
            self.trainer_stop.set()
            self.trainer_thread.join(timeout=300)
            if self.trainer_thread.is_alive():
                raise RuntimeError(f"the trainer of {self.active_model!r} did not stop in 300 s")
            self.threads.remove(self.trainer_thread)
            old_store, old_name = self.store, self.active_model
            try:
                store, trainer, _ = self._open_model(md)
            except Exception:
                self._start_trainer_again()
                raise
            controller = self._make_controller(trainer, md, store)
            self.store, self.controller, self.model_tokenizer, self.active_model = store, controller, \
                trainer.model.tokenizer, name
            stages = self.api.s
            stages.controller, stages.store, stages.tokenizer = controller, store, trainer.model.tokenizer
            stages.model_path, stages.active_model = md.model, name
            self.models.set_active(name)
            self._start_trainer()
            old_store.close()
        log.info("switched the active model from %r to %r", old_name, name)
        self.server.publish("model", {"active": name, "previous": old_name})
        return self.models.info(name)

    def _start_trainer_again(self) -> None:
        # opening the new model failed: the old one trains on (its state is on disk, reopen it)
        md = self.dirs.model_dir(self.active_model)
        self.store.close()
        self.store, trainer, _ = self._open_model(md)
        self.controller = self._make_controller(trainer, md, self.store)
        self.api.s.controller, self.api.s.store = self.controller, self.store
        self._start_trainer()

    def _sweep_crash_leftovers(self) -> None:
        """The temporary files of writes a crash interrupted (checkpoints, model files), in the
        state directory of before named models and in each model's; safe because we hold the
        state lock: nobody else writes here. The queue and the data store sweep their own
        directories as they open."""
        roots = [self.dirs.legacy_model_dir]
        if self.dirs.models.is_dir():
            roots += [self.dirs.model_dir(p.name) for p in self.dirs.models.iterdir()
                      if p.is_dir() and not p.name.startswith(".")]
        for md in roots:
            for d in (md.root, md.checkpoints):
                removed = sweep_temps(d)
                if removed:
                    log.warning("removed %d temporary file(s) (%d bytes) left in %s by a crash",
                                len(removed), sum(removed.values()), d)

    def _tcp_options(self) -> dict:
        s = self.settings.server
        if not s.tcp and not s.events_tcp:
            return {}
        import socket

        import zmq.auth
        for key, endpoint in (("server.tcp", s.tcp), ("server.events_tcp", s.events_tcp)):
            if not endpoint:
                continue
            try:  # under the unit's RestrictAddressFamilies=AF_UNIX, libzmq would abort the process
                socket.socket(socket.AF_INET6 if endpoint.startswith("tcp://[") else socket.AF_INET).close()
            except OSError as e:
                raise SettingsError(f"{key} = {endpoint!r}: this process may not open network sockets "
                                    f"({e.strerror}); under systemd install the TCP drop-in (cllmd-tcp.conf)") from None
        secret = Path(s.curve_secret_key_file)
        public, secret_key = zmq.auth.load_certificate(secret)
        if secret_key is None:
            raise SettingsError(f"{secret}: not a CURVE secret key file")
        return {"tcp": s.tcp or None, "events_tcp": s.events_tcp or None,
                "curve": (secret_key, public, s.curve_authorized_keys_dir)}

    def _spawn(self, name: str, target) -> None:
        beat = self.heartbeats.beater(name)
        t = threading.Thread(target=self._guard, args=(name, target, beat), name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _guard(self, name, target, beat) -> None:
        try:
            target(self.stop_event, beat)
        except Exception:
            log.exception("the %s thread failed; shutting down so the service manager restarts cllmd", name)
            self.signals.put("fatal")

    def _queue_event(self, ev: dict) -> None:
        state = ev.get("state")
        self.queue_current = ev.get("name") if state == "processing" else None
        self.server.publish("queue", {"counts": self.queue.counts(), "current": self.queue_current,
                                      "change": {"name": ev.get("name"), "state": state,
                                                 "reason": ev.get("reason")}})
        if state == "failed":
            self.server.publish("error", {"source": "queue", "message": f"{ev.get('name')}: {ev.get('reason')}"})

    # ---- the ingest stage ----------------------------------------------------------------------

    def _ingest(self, pre, sha256: str) -> dict:
        """Queue -> tokenizer -> data store; the queue moves the file to done/ after this returns.
        The text goes through in pieces (Preprocessed.pieces, Tokenizer.encode_stream), each
        written to the store as it comes: memory stays bounded whatever the file's size."""
        import itertools

        import numpy as np
        with self.switch_lock:  # the active model's tokenizer, store and controller, together
            existing = self.store.get(sha256)
            if existing is not None:
                return {"tokens": existing.tokens, "duplicate": True}
            tok = self.model_tokenizer
            ids = itertools.chain(tok.encode_stream(pre.pieces()),
                                  [np.array([tok.eot_id], dtype=np.int32)])
            offset = self.store.num_tokens("train")  # where a train document lands in the stream
            # a byte-level token holds at least one byte of the text: at most size + 1 tokens
            doc = self.store.append_stream(ids, source=pre.source or "", sha256=sha256,
                                           max_tokens=pre.size + 1)
            if doc.split == "train":
                self.controller.add_tokens(doc.tokens, since=offset)
            return {"tokens": doc.tokens, "duplicate": False, "split": doc.split}

    # ---- supervision ---------------------------------------------------------------------------

    def status_line(self) -> str:
        snap = self.controller.trainer.snapshot() if hasattr(self, "controller") else {}
        counts = self.queue.counts() if hasattr(self, "queue") else {}
        loss = snap.get("loss")
        loss_text = f"{loss:.3f}" if isinstance(loss, float) else "-"
        return (f"step {snap.get('step', 0)}, loss {loss_text}, {self.controller.state if hasattr(self, 'controller') else 'starting'}; "
                f"queue {counts.get('incoming', 0)} waiting, {counts.get('done', 0)} done, {counts.get('failed', 0)} failed")

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: self.signals.put(signum))

    def reload(self) -> None:
        sdnotify.reloading()
        from cllmd.models import ModelsError
        try:
            new = load_settings(self.dirs.config_file, self.config_overrides)
            train = self._settings_for(self.dirs.model_dir(self.active_model), new)
        except (SettingsError, ModelsError) as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            sdnotify.ready()
            return
        self.settings = new
        logging.getLogger().setLevel(new.log.level.upper())
        from cllm.catalogue import runtime_settings
        # the active model's own settings still stand over the file's
        self.controller.configure({s.name: train.get(s.key) for s in runtime_settings()})
        self.controller.settings.events_interval = new.server.events_interval
        from cllmd.generate import weights_problem
        weights = new.inference.weights
        if weights_problem(weights):
            log.error("reload: inference.weights = %r refused, generation keeps %r: %s", weights,
                      self.batcher.weights, weights_problem(weights))
            weights = None
        self.batcher.configure(weights, new.inference.kv_cache_bytes)
        log.info("configuration reloaded from %s", self.dirs.config_file or "defaults")
        sdnotify.ready()

    def request_stop(self) -> None:
        self.signals.put(signal.SIGTERM)

    def supervise(self) -> int:
        watchdog = sdnotify.watchdog_interval()
        last_watchdog = last_status = last_train_event = 0.0
        exit_code = 0
        while True:
            try:
                sig = self.signals.get(timeout=0.25)
            except stdlib_queue.Empty:
                sig = None
            if sig in (signal.SIGTERM, signal.SIGINT):
                log.info("stopping (signal %s)", signal.Signals(sig).name)
                break
            if sig == "fatal":
                exit_code = 1
                break
            if sig == signal.SIGHUP:
                self.reload()
            elif sig == signal.SIGUSR1:
                log.info("checkpoint requested (SIGUSR1)")
                self.controller.ask_checkpoint()
            now = time.monotonic()
            if watchdog and now - last_watchdog >= watchdog:
                stale = self.heartbeats.stale(max(STALE_HEARTBEAT_SECONDS, 3 * watchdog))
                if stale:
                    log.error("no heartbeat from %s: withholding the watchdog ping", ", ".join(stale))
                else:
                    sdnotify.watchdog()
                    last_watchdog = now
            if self.controller.state == "running" and \
                    now - last_train_event >= self.settings.server.events_interval:
                # published from here, not between steps, so subscribers see the spheres working
                self.server.publish("train", self.controller.status())
                last_train_event = now
            if now - last_status >= 2.0:
                sdnotify.status(self.status_line())
                last_status = now
        self.shutdown()
        return exit_code

    def shutdown(self) -> None:
        """Graceful: stop taking requests, end generations, finish the step, checkpoint, exit."""
        sdnotify.stopping()
        self.stop_event.set()
        self.trainer_stop.set()
        self.watcher.wake()
        for t in self.threads:
            t.join(timeout=300)
            if t.is_alive():
                log.error("thread %s did not stop in time", t.name)
        self.server.close()
        self.store.close()
        log.info("stopped")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cllmd serve", description="Run the cllmd daemon in the foreground.")
    p.add_argument("--state-dir", help="models, checkpoints, data store, queue (default: $STATE_DIRECTORY or $XDG_STATE_HOME/cllmd)")
    p.add_argument("--runtime-dir", help="sockets (default: $RUNTIME_DIRECTORY or $XDG_RUNTIME_DIR/cllmd)")
    p.add_argument("--cache-dir", help="compiled kernels, default corpus (default: $CACHE_DIRECTORY or $XDG_CACHE_HOME/cllmd)")
    p.add_argument("--config", help="configuration file (default: /etc/cllmd/cllmd.toml when present)")
    add_arguments(p)
    return p


def serve(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(threadName)s %(name)s: %(message)s")
    try:
        dirs = Dirs.resolve(state_dir=args.state_dir, runtime_dir=args.runtime_dir,
                            cache_dir=args.cache_dir, config=args.config)
        overrides = overrides_from_args(args)
        settings = load_settings(dirs.config_file, overrides)
        dirs.ensure()
    except (SettingsError, PathsError) as e:
        print(f"cllmd: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"cllmd: cannot prepare directories: {e}", file=sys.stderr)
        return 1
    logging.getLogger().setLevel(settings.log.level.upper())
    # numba reads its cache location once, at import: before any kernel is imported
    os.environ.setdefault("NUMBA_CACHE_DIR", str(dirs.cache / "numba"))
    lock = StateLock(dirs.state)
    try:
        lock.acquire()
    except AlreadyRunning as e:
        print(f"cllmd: {e}", file=sys.stderr)
        return 1
    return_large_blocks()   # a large request's buffers leave no RSS behind (cllmd/heap.py)
    daemon = Daemon(dirs, settings, overrides)
    daemon.install_signals()
    from cllmd.models import ModelsError
    try:
        daemon.start()
    except (SettingsError, ModelsError) as e:
        print(f"cllmd: {e}", file=sys.stderr)
        return 2
    return daemon.supervise()
