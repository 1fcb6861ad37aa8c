"""/metrics: the daemon's figures in Prometheus' text format, every name `cllmd_`, counters
ending in `_total`. Daemon-side figures are read from a `stats` reply at each scrape; step
durations and ingested files are taken from the daemon's events; generation figures are the
requests this gateway served."""
from __future__ import annotations

import math
from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cllm import __version__
from cllm.wire import PROTOCOL_VERSION

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUEUE_STATES = ("incoming", "processing", "done", "failed")
TRAIN_STATES = ("idle", "running", "paused", "stopping")
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class DaemonCollector:
    """Yields the figures of the last `stats` reply (``stats`` None: the daemon is down)."""

    def __init__(self) -> None:
        self.stats: dict | None = None

    def describe(self):
        return []   # families depend on the reply; nothing to check at registration

    def collect(self):
        s = self.stats
        up = GaugeMetricFamily("cllmd_up", "1 when the daemon answered this scrape's stats request")
        up.add_metric([], 0 if s is None else 1)
        yield up
        daemon = (s or {}).get("daemon") or {}
        build = GaugeMetricFamily("cllmd_build_info", "versions of the gateway, the daemon and the protocol",
                                  labels=["version", "daemon_version", "protocol"])
        build.add_metric([__version__, str(daemon.get("version", "")), str(PROTOCOL_VERSION)], 1)
        yield build
        if s is None:
            return
        train, model, queue, serving = (s.get(k) or {} for k in ("train", "model", "queue", "serving"))

        def gauge(name, doc, value, labels=None, values=()):
            g = GaugeMetricFamily(name, doc, labels=labels)
            if (v := _num(value)) is not None:
                g.add_metric(list(values), v)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc)
            if (v := _num(value)) is not None:
                c.add_metric([], v)
            return c

        yield counter("cllmd_train_steps", "optimizer steps taken", train.get("step"))
        yield counter("cllmd_train_tokens", "training tokens processed", train.get("tokens_seen"))
        yield counter("cllmd_train_skipped_steps", "steps skipped for non-finite gradients",
                      train.get("skipped_steps"))
        yield gauge("cllmd_train_loss", "training loss of the last step (token-weighted mean, nats)", train.get("loss"))
        yield gauge("cllmd_train_val_loss", "last validation loss (nats)", train.get("val_loss"))
        yield gauge("cllmd_train_learning_rate", "learning rate of the last step", train.get("lr"))
        yield gauge("cllmd_train_grad_norm", "global gradient norm of the last step, before clipping",
                    train.get("grad_norm"))
        yield gauge("cllmd_train_tokens_per_second", "training throughput", train.get("tokens_per_second"))
        yield gauge("cllmd_train_threads", "threads serving the spheres", train.get("threads"))
        yield gauge("cllmd_train_batch_size", "sequences per step", train.get("batch_size"))
        state = GaugeMetricFamily("cllmd_train_state", "1 for the trainer's current state", labels=["state"])
        for name in TRAIN_STATES:
            state.add_metric([name], 1 if train.get("state") == name else 0)
        yield state
        busy = CounterMetricFamily("cllmd_sphere_busy_seconds", "seconds each sphere spent computing",
                                   labels=["sphere"])
        idle = CounterMetricFamily("cllmd_sphere_idle_seconds", "seconds each sphere spent waiting",
                                   labels=["sphere"])
        toks = CounterMetricFamily("cllmd_sphere_tokens", "training tokens each sphere processed",
                                   labels=["sphere"])
        for sp in train.get("spheres") or []:
            if not isinstance(sp, dict):
                continue
            sid = str(sp.get("id"))
            for fam, key in ((busy, "busy_s"), (idle, "idle_s"), (toks, "tokens")):
                if (v := _num(sp.get(key))) is not None:
                    fam.add_metric([sid], v)
        yield busy
        yield idle
        yield toks
        files = GaugeMetricFamily("cllmd_queue_files", "files in the queue by state", labels=["state"])
        for name in QUEUE_STATES:
            if (v := _num(queue.get(name))) is not None:
                files.add_metric([name], v)
        yield files
        yield gauge("cllmd_model_parameters", "parameters of the active model", model.get("parameters"),
                    ["model"], [str(model.get("name", ""))])
        yield gauge("cllmd_model_context_tokens", "context length of the active model", model.get("context"),
                    ["model"], [str(model.get("name", ""))])
        yield gauge("cllmd_generation_running", "generations running in the daemon", serving.get("running"))
        yield gauge("cllmd_generation_waiting", "generations waiting for a worker", serving.get("waiting"))
        yield gauge("cllmd_daemon_uptime_seconds", "seconds since the daemon started", daemon.get("uptime_s"))
        yield gauge("cllmd_daemon_resident_memory_bytes", "the daemon's resident memory", daemon.get("rss_bytes"))


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()   # no *_created series: each counter is one series per label set
        self.registry = CollectorRegistry()
        r = self.registry
        self.daemon = DaemonCollector()
        r.register(self.daemon)
        self.requests = Counter("cllmd_generation_requests", "generation requests served by the "
                                "gateway, by how they ended (length, stop, cancelled, error)",
                                ["status"], registry=r)
        self.tokens = Counter("cllmd_generation_tokens", "tokens generated for the gateway's requests", registry=r)
        self.ttft = Histogram("cllmd_generation_time_to_first_token_seconds",
                              "time from a request reaching the gateway to its first piece of text",
                              buckets=TTFT_BUCKETS, registry=r)
        self.step_seconds = Histogram("cllmd_train_step_duration_seconds",
                                      "duration of training steps (each step between two train events "
                                      "counted at their mean)", buckets=STEP_BUCKETS, registry=r)
        self.ingested = Counter("cllmd_queue_files_ingested", "queue files finished since the gateway "
                                "started, by result (done, failed)", ["result"], registry=r)
        for status in ("length", "stop", "cancelled", "error"):
            self.requests.labels(status)
        for result in ("done", "failed"):
            self.ingested.labels(result)
        self._last_train: tuple[int, float] | None = None

    # ---- fed by the gateway ----------------------------------------------------------------------

    def on_event(self, topic: str, payload: dict) -> None:
        if topic == "train":
            step, when = payload.get("step"), payload.get("time")
            if not isinstance(step, int) or not isinstance(when, (int, float)):
                return
            last, self._last_train = self._last_train, (step, when)
            # only intervals spent running: a pause in between would count as one long step
            if last is None or payload.get("state") != "running" or step <= last[0]:
                return
            n = step - last[0]
            mean = (when - last[1]) / n
            for _ in range(min(n, 1000)):
                self.step_seconds.observe(mean)
        elif topic == "queue":
            change = payload.get("change") or {}
            if change.get("state") in ("done", "failed"):
                self.ingested.labels(change["state"]).inc()

    def generation_ended(self, stream) -> None:
        """Count one request: by its stop reason, "error" when it failed, "cancelled" when the
        client went away before the end (its tokens counted as the pieces it was sent)."""
        stats = stream.stats
        if stream.error is not None:
            status = "error"
        elif stats is None:
            status = "cancelled"
        else:
            status = {"max_tokens": "length", "cancelled": "cancelled", "error": "error"}.get(
                stats.get("stop_reason"), "stop")
        self.requests.labels(status).inc()
        self.tokens.inc(int(stats.get("tokens_generated") or 0) if stats else stream.pieces)
        if stream.first_token_s is not None:
            self.ttft.observe(stream.first_token_s)

    def exposition(self, stats: dict | None) -> bytes:
        self.daemon.stats = stats
        return generate_latest(self.registry)
