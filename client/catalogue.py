"""The catalogue: every setting of cllmd and every sampling option of `generate`, declared once.

Everything else is derived from these two tables: TOML validation and the commented default
cllmd.toml (cllmd.settings), the flags of `cllmd serve` and `cllmd train`, the argument specs of
`train.config.get/set` and `generate` (cllmd.protocol), the client's keys and flags (cllm.cli,
cllm.chat), TrainConfig's and the controller's defaults, the reload mapping and the docs tables
(tests/test_catalogue.py walks every surface). Standard library only: the client imports it.

To add a setting: add one Setting(...) line to SETTINGS, in its section, with its kind (which
carries the bounds), default, one-line doc, unit and where it applies:
  - "trainer": becomes a field of cllmd.trainer.TrainConfig of the same name (fields_of);
  - "controller": becomes a field of cllmd.controller.ControllerSettings (fields_of);
  - "daemon", "generation", "gateway": read by that stage from its Settings section.
runtime=True puts a train.* setting into train.config.get/set, `cllm train config` and the
reload mapping; offline=True gives `cllmd train` a flag for it. A rule involving several keys
goes into RULES. Then regenerate systemd/cllmd.toml (python -m cllmd.settings) and the table
of docs/service.md (python -m cllmd.settings --docs); a runtime one also gets its row under
train.config.set in docs/protocol.md (tests/test_catalogue.py says what is missing).
Renaming a key whose meaning changes: add the old key to RENAMED, so that it is refused with a
message naming the new one.
To add a sampling option: one SamplingOption line in SAMPLING (and the field in
cllmd.generate.SamplingOptions, which takes its default from here).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --------------------------------------------------------------------------------------------
# Kinds of values. A kind checks (and normalizes) a value from TOML, msgpack or Python, parses
# the text of a flag, and renders a value as TOML. `describe` completes "must be ...", so every
# refusal reads the same way. `wire` is the protocol type; lo/hi/lo_open the bounds a protocol
# spec can state (check() enforces every bound, including those it cannot).


@dataclass(frozen=True)
class Kind:
    describe: str
    check: Callable[[Any], Any]  # normalized value, or raises ValueError
    parse: Callable[[str], Any] | None  # command-line text -> value; None = strings pass through
    render: Callable[[Any], str]
    metavar: str
    wire: Any = str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def value(self, raw: Any, *, from_text: bool = True) -> Any:
        """raw (text if from_text, else a typed value) checked and normalized; ValueError."""
        try:
            value = self.parse(raw) if from_text and isinstance(raw, str) and self.parse else raw
            return self.check(value)
        except (ValueError, TypeError, OverflowError):
            raise ValueError(f"must be {self.describe}, got {raw!r}") from None


def _toml_str(value: str) -> str:
    # A TOML basic string takes JSON's escapes; \uXXXX keeps the file pure ASCII.
    return json.dumps(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def boolean() -> Kind:
    words = {**{w: True for w in TRUE_WORDS}, **{w: False for w in FALSE_WORDS}}

    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise ValueError
        return v

    def parse(text: str) -> bool:
        try:
            return words[text.strip().lower()]
        except KeyError:
            raise ValueError from None

    return Kind("true or false", check, parse, lambda v: "true" if v else "false", "BOOL", bool)


def integer(lo: int, hi: int | None = None) -> Kind:
    describe = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def check(v: Any) -> int:
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            raise ValueError
        return v

    return Kind(describe, check, lambda t: int(t.strip()), str, "N", int, lo, hi)


def plain_number(x: float) -> str:
    """1000000 rather than 1e+06: bounds are read by people."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def number(*, gt: float | None = None, ge: float | None = None, le: float | None = None,
           lt: float | None = None) -> Kind:
    bounds = [f"{op} {plain_number(x)}" for op, x in ((">", gt), (">=", ge), ("<=", le), ("<", lt))
              if x is not None]
    describe = "a number " + " and ".join(bounds)

    def check(v: Any) -> float:
        if not (_is_int(v) or isinstance(v, float)):
            raise ValueError
        x = float(v)
        if (not math.isfinite(x) or (gt is not None and x <= gt) or (ge is not None and x < ge)
                or (le is not None and x > le) or (lt is not None and x >= lt)):
            raise ValueError
        return x

    return Kind(describe.strip(), check, lambda t: float(t.strip()), repr, "X", float,
                gt if gt is not None else ge, le, gt is not None)


def choice(*options: str) -> Kind:
    describe = "one of " + ", ".join(repr(o) for o in options)

    def check(v: Any) -> str:
        if not isinstance(v, str) or v not in options:
            raise ValueError
        return v

    return Kind(describe, check, None, _toml_str, "{" + ",".join(options) + "}", str)


def text(describe: str = "a string", pattern: str | None = None) -> Kind:
    rx = re.compile(pattern) if pattern else None

    def check(v: Any) -> str:
        if not isinstance(v, str) or (rx is not None and not rx.fullmatch(v)):
            raise ValueError
        return v

    return Kind(describe, check, None, _toml_str, "TEXT", str)


_SIZE_RX = re.compile(r"\s*(\d+)\s*(k|kib|m|mib|g|gib)?\s*", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB}


def size(lo: int) -> Kind:
    describe = f'a size >= {lo} bytes: an integer, or a string like "64MiB" (KiB, MiB or GiB)'

    def check(v: Any) -> int:
        if isinstance(v, str):
            m = _SIZE_RX.fullmatch(v)
            if not m:
                raise ValueError
            v = int(m.group(1)) * _SIZE_UNITS[m.group(2) and m.group(2).lower()]
        if not _is_int(v) or v < lo:
            raise ValueError
        return v

    def render(v: int) -> str:
        for unit, n in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
            if v % n == 0:
                return _toml_str(f"{v // n}{unit}")
        return str(v)

    return Kind(describe, check, None, render, "SIZE", (int, str), lo)


def names() -> Kind:
    def check(v: Any) -> tuple[str, ...]:
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
            raise ValueError
        return tuple(v)

    def parse(t: str) -> tuple[str, ...]:
        return tuple(s.strip() for s in t.split(",") if s.strip())

    return Kind("a non-empty list of non-empty strings", check, parse,
                lambda v: "[" + ", ".join(_toml_str(s) for s in v) + "]", "A,B,...", list)


# tcp://host:port with a name, an IPv4 address, '*' or a bracketed IPv6 address.
_TCP = r"|tcp://(\*|[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):([1-9][0-9]{0,4})"

# --------------------------------------------------------------------------------------------
# The settings.

APPLIES = ("trainer", "controller", "daemon", "generation", "gateway")


@dataclass(frozen=True)
class Setting:
    key: str            # "section.name": the TOML key; the `cllmd serve` flag is --section-name
    kind: Kind
    default: Any
    doc: str            # one line, lower case, no final stop
    applies: str        # one of APPLIES: the stage that reads it
    unit: str = ""
    runtime: bool = False   # in train.config.get/set, `cllm train config` and the reload mapping
    offline: bool = False   # `cllmd train` has a flag for it, --name
    path: bool = False      # a file path: relative values are taken from the TOML file's directory

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]

    @property
    def serve_flag(self) -> str:
        return "--" + self.key.replace(".", "-").replace("_", "-")

    @property
    def train_flag(self) -> str | None:
        return "--" + self.name.replace("_", "-") if self.offline else None


def _settings(*items: Setting) -> dict[str, Setting]:
    table = {s.key: s for s in items}
    if len(table) != len(items):
        raise ValueError("the catalogue declares a setting twice")
    return table


# Defaults are sized for a small model that visibly learns within minutes on 2 cores.
# what generation may multiply by (cllmd.generate.InferenceWeights; `cllmd generate --weights`)
INFERENCE_WEIGHTS = ("float32", "int8", "bf16")

SETTINGS: dict[str, Setting] = _settings(
    # [server]
    Setting("server.tcp", text('"" or "tcp://HOST:PORT"', _TCP), "",
            'also listen on TCP, e.g. "tcp://127.0.0.1:5555"; requires both CURVE settings '
            'below; "" = IPC sockets only', "daemon"),
    Setting("server.events_tcp", text('"" or "tcp://HOST:PORT"', _TCP), "",
            'also publish the events on TCP, e.g. "tcp://127.0.0.1:5556", with the same CURVE '
            'keys; "" = events over IPC only', "daemon"),
    Setting("server.curve_secret_key_file", text("a path"), "",
            "the server's CURVE secret key file (zmq.auth format); relative paths are taken "
            "from this file's directory", "daemon", path=True),
    Setting("server.curve_authorized_keys_dir", text("a path"), "",
            "directory of the CURVE public keys of the clients allowed over TCP", "daemon",
            path=True),
    Setting("server.max_message_bytes", size(4 * KiB), 16 * MiB,
            "largest request accepted; bigger ones are refused", "daemon", "bytes"),
    Setting("server.generate_workers", integer(1, 64), 2,
            "generations that run at the same time, decoded together in one batch", "generation"),
    Setting("server.max_pending_generations", integer(0, 10_000), 8,
            'generations that may wait for a worker; beyond this, requests get "busy"',
            "generation"),
    Setting("server.stream_timeout", number(gt=0), 30.0,
            "seconds a streamed generation waits for a client that stopped reading before it "
            "is cancelled", "generation", "s"),
    Setting("server.events_interval", number(gt=0), 1.0,
            "seconds between trainer statistics events on the PUB socket", "daemon", "s"),
    # [model]: used only to create a new model (the daemon's first start, `cllmd train`).
    Setting("model.tokenizer", choice("bpe", "bytes"), "bpe",
            "byte-level BPE trained on the training text, or plain bytes", "daemon",
            offline=True),
    Setting("model.vocab_size", integer(257, 1 << 20), 4096,
            "BPE vocabulary size (ignored for bytes)", "daemon", "tokens", offline=True),
    Setting("model.n_layer", integer(1, 64), 4, "transformer blocks", "daemon", offline=True),
    Setting("model.n_head", integer(1, 64), 4, "attention heads per block", "daemon",
            offline=True),
    Setting("model.n_embd", integer(8, 8192), 128, "embedding width; a multiple of n_head",
            "daemon", offline=True),
    Setting("model.block_size", integer(8, 65536), 128, "context length in tokens", "daemon",
            "tokens", offline=True),
    Setting("model.init", choice("normal", "lattice"), "normal",
            "token-embedding initialisation: GPT-2's normal(0, 0.02) or the prime/golden-angle "
            "lattice", "daemon", offline=True),
    Setting("model.clock_positions", boolean(), False,
            "add 12-periodic angle features to the position embedding", "daemon", offline=True),
    # [train]: the runtime ones can also be changed while the daemon runs (train.config.set).
    Setting("train.auto_train", boolean(), True,
            "train whenever new tokens arrive in the data store", "controller", runtime=True),
    Setting("train.threads", integer(0, 12), 0,
            "sphere worker threads: 0 = the usable cores, else 1 to 12", "controller",
            "threads", runtime=True, offline=True),
    Setting("train.batch_size", integer(1, 4096), 12,
            "sequences per step, split over the 12 spheres", "trainer", "sequences",
            runtime=True, offline=True),
    Setting("train.lr", number(gt=0, le=1), 1e-3, "peak learning rate (AdamW)", "trainer",
            runtime=True, offline=True),
    Setting("train.min_lr", number(ge=0, le=1), 1e-4,
            "learning rate at the end of the cosine decay; <= lr", "trainer", runtime=True,
            offline=True),
    Setting("train.warmup", integer(0, 10**9), 100, "steps of linear warmup from 0 to lr",
            "trainer", "steps", runtime=True, offline=True),
    Setting("train.decay_end_step", integer(0, 10**12), 5000,
            "the step at which the cosine decay (from the end of warmup) reaches min_lr; "
            "min_lr after it", "trainer", "step", runtime=True, offline=True),
    Setting("train.grad_clip", number(ge=0, le=1e6), 1.0,
            "clip the global gradient norm to this; 0 = no clipping", "trainer", runtime=True,
            offline=True),
    Setting("train.weight_decay", number(ge=0, le=1), 0.1, "AdamW decoupled weight decay",
            "trainer", runtime=True, offline=True),
    Setting("train.eval_interval", integer(0, 10**9), 200,
            "steps between validation evaluations; 0 = never", "trainer", "steps", runtime=True,
            offline=True),
    Setting("train.checkpoint_interval_steps", integer(0, 10**9), 500,
            "write a checkpoint every this many steps; 0 = not by steps", "controller", "steps",
            runtime=True),
    Setting("train.checkpoint_interval_seconds", number(ge=0, le=1e7), 300.0,
            "write a checkpoint at least this often while training; 0 = not by time",
            "controller", "s", runtime=True),
    Setting("train.snapshot_interval", integer(1, 10**9), 20,
            "publish the weights to inference every this many steps", "controller", "steps",
            runtime=True),
    Setting("train.seed", integer(0, 2**32 - 1), 1337,
            "random seed for initialisation and batch sampling", "trainer", offline=True),
    Setting("train.grad_checkpointing", boolean(), False,
            "recompute each block's activations in the backward pass: 60-74% less activation "
            "memory, 12-17% slower steps", "trainer", runtime=True, offline=True),
    Setting("train.precision", choice("auto", "float32", "bf16"), "auto",
            "the trainer's matrix products: bf16 = bfloat16 operands, float32 accumulation and "
            "weights (needs MKL, cllmd[mkl], and AMX or AVX-512 BF16); auto = bf16 where "
            "available and faster, else float32", "trainer", offline=True),
    Setting("train.auto_epochs", number(gt=0, le=1e6), 1.0,
            "auto-training budget: passes over the newly arrived tokens", "controller", "passes",
            runtime=True),
    Setting("train.replay_fraction", number(ge=0, lt=1), 0.25,
            "share of each auto-training batch replayed from older data, so earlier knowledge "
            "is not forgotten", "controller", runtime=True),
    # [queue]
    Setting("queue.max_file_bytes", size(1), 64 * MiB, "larger queued files are refused into failed/",
            "daemon", "bytes"),
    Setting("queue.max_attempts", integer(1, 100), 3,
            "ingestion attempts of a file before it goes to failed/", "daemon"),
    Setting("queue.rescan_seconds", number(gt=0), 30.0,
            "full rescan of incoming/ this often, besides inotify", "daemon", "s"),
    Setting("queue.json_fields", names(), ("text", "content", "body"),
            "JSON/JSONL fields taken as a record's text, in order of preference; records "
            "without one contribute all their string values", "daemon"),
    # [inference]: the daemon's generations (cllmd.batching).
    Setting("inference.weights", choice(*INFERENCE_WEIGHTS), "float32",
            "the weights generation multiplies by: float32, int8 quantized at load (groups "
            "of 32, ~3-5x faster decoding at GPT-2's size), or bf16 (bfloat16, rounded to "
            "nearest even at load; needs the extra cllmd[mkl])", "generation"),
    Setting("inference.kv_cache_bytes", size(4 * KiB), 1 * GiB,
            "the running generations' KV caches together hold at most this; beyond it, "
            'requests get "busy"', "generation", "bytes"),
    # [log]
    Setting("log.level", choice("debug", "info", "warning", "error", "critical"), "info",
            "lowest level of the log lines written to stderr", "daemon"),
)

SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS.values()))

# A model's own settings (<state>/models/NAME/settings.json): the runtime train settings, all but
# threads (the machine's, not the model's). They stand over the configuration file for that
# model, the command line over them; train.config.set records its changes there.
MODEL_SETTINGS: tuple[str, ...] = tuple(s.name for s in SETTINGS.values()
                                        if s.runtime and s.key != "train.threads")

# The fine-tuning defaults: the own settings a model made from existing weights gets (`cllm model
# create NAME --from` a Hugging Face directory or a .cllm file); the defaults above suit training
# from scratch. Measured by benchmarks/bench_finetune.py (docs/huggingface.md, "Fine-tuning").
FINETUNE: dict[str, Any] = {
    "lr": 3e-4,              # the weights know a language already: 1e-3 learns a new file faster
    "min_lr": 3e-5,          # but forgets 1.5x as much of what they knew
    "warmup": 20,            # AdamW's moments start empty: ~1/(1 - beta2) steps to fill them
    "replay_fraction": 0.5,  # half of each batch replays the files learnt before
}

# Keys that were renamed because their meaning changed: old key -> (new key, how to convert).
RENAMED: dict[str, tuple[str, str]] = {
    "train.decay_steps": ("train.decay_end_step",
                          "decay_steps counted the steps after warmup; decay_end_step is the "
                          "step at which the decay ends: set it to warmup + the old value"),
}


def default_of(key: str) -> Any:
    return SETTINGS[key].default


def field_of(key: str) -> Any:
    """A dataclass field whose default is the setting's."""
    return field(default=SETTINGS[key].default)


def fields_of(applies: str, *, exclude: Iterable[str] = ()) -> list[tuple[str, type, Any]]:
    """The dataclass fields (name, type, field) of the settings that stage `applies` reads, in
    catalogue order, defaults from here: TrainConfig and ControllerSettings are made of them,
    so a setting added here reaches them with nothing to repeat."""
    skip = set(exclude)
    return [(s.name, type(s.default), field(default=s.default)) for s in SETTINGS.values()
            if s.applies == applies and s.name not in skip]


def runtime_settings() -> list[Setting]:
    """The train.config.get/set keys, in catalogue order."""
    return [s for s in SETTINGS.values() if s.runtime]


def renamed_error(key: str) -> str | None:
    """The refusal of an old key ('train.decay_steps' or its bare name), else None."""
    full = key if "." in key else f"train.{key}"
    if full not in RENAMED:
        return None
    new, how = RENAMED[full]
    new = new if "." in key else new.split(".", 1)[1]
    return f"renamed to {new}: {how}"


# Rules over several settings. Each takes the values by dotted key (only those known: a rule
# whose keys are absent does not apply) and returns (key, reason) or None.

def _lr_floor(v: Mapping[str, Any]):
    if "train.lr" in v and "train.min_lr" in v and v["train.min_lr"] > v["train.lr"]:
        return "train.min_lr", f"must be <= train.lr ({v['train.lr']!r}), got {v['train.min_lr']!r}"
    return None


def _heads_divide_width(v: Mapping[str, Any]):
    if "model.n_embd" in v and "model.n_head" in v and v["model.n_embd"] % v["model.n_head"]:
        return "model.n_embd", (f"must be a multiple of model.n_head ({v['model.n_head']}), "
                                f"got {v['model.n_embd']}")
    return None


def _tcp_needs_curve(v: Mapping[str, Any]):
    for tcp in ("server.tcp", "server.events_tcp"):
        if v.get(tcp):
            for key in ("server.curve_secret_key_file", "server.curve_authorized_keys_dir"):
                if not v.get(key):
                    return tcp, f"TCP is only served with CURVE encryption: {key} must be set"
    return None


RULES: tuple[Callable[[Mapping[str, Any]], tuple[str, str] | None], ...] = (
    _lr_floor, _heads_divide_width, _tcp_needs_curve)


def check_rules(values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first rule broken by `values` (dotted keys) as (key, reason), else None."""
    for rule in RULES:
        broken = rule(values)
        if broken:
            return broken
    return None


def check_section(section: str, values: Mapping[str, Any]) -> str | None:
    """One refusal text for bare-named values of one section (TrainConfig, train.config.set):
    each value against its kind, then the rules; None when all is well."""
    full = {f"{section}.{k}": v for k, v in values.items()}
    for key, value in full.items():
        spec = SETTINGS.get(key)
        if spec is None:
            continue
        try:
            spec.kind.value(value, from_text=False)
        except ValueError as e:
            return f"{spec.name} {e}"
    broken = check_rules(full)
    if broken:
        key, reason = broken  # said with bare names, as the values came
        return f"{key.split('.', 1)[1]} {reason}".replace(f"{section}.", "")
    return None


# --------------------------------------------------------------------------------------------
# The sampling options of `generate`: the protocol's arguments, `cllm generate` and `cllm chat`
# (their flags and /set keys), `cllmd generate` and cllmd.generate.SamplingOptions.

MAX_STOPS, MAX_STOP_CHARS = 16, 1024


def check_stops(stops: list[str]) -> list[str]:
    """The stop strings, or ValueError saying which rule they break."""
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str):
            raise ValueError(f"a stop string must be a string, got {s!r}")
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"a stop string must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
    return list(stops)


def stops() -> Kind:
    def check(v: Any) -> tuple[str, ...]:
        if not isinstance(v, (list, tuple)):
            raise ValueError
        return tuple(check_stops(list(v)))

    return Kind(f"at most {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters", check, None,
                lambda v: "[" + ", ".join(_toml_str(s) for s in v) + "]", "TEXT", list, 0,
                MAX_STOPS)


@dataclass(frozen=True)
class SamplingOption:
    kind: Kind
    default: Any        # None only for seed: a fresh one each time
    doc: str
    nullable: bool = False


SAMPLING: dict[str, SamplingOption] = {
    "max_tokens": SamplingOption(integer(1, 65536), 128, "new tokens at most"),
    "temperature": SamplingOption(number(ge=0, le=10), 0.8, "sampling temperature; 0 = greedy"),
    "top_k": SamplingOption(integer(0, 2**31 - 1), 0, "keep the k most likely tokens; 0 = off"),
    "top_p": SamplingOption(number(gt=0, le=1), 1.0, "nucleus sampling mass; 1 = off"),
    "min_p": SamplingOption(number(ge=0, le=1), 0.0,
                            "drop tokens below min_p x the top probability; 0 = off"),
    "repeat_penalty": SamplingOption(number(gt=0, le=10), 1.0,
                                     "penalty on recent tokens; 1 = off"),
    "repeat_last_n": SamplingOption(integer(0, 2**31 - 1), 64,
                                    "recent tokens the penalty looks at; 0 = off"),
    "seed": SamplingOption(integer(0, 2**64 - 1), None,
                           "random seed: the same seed and options give the same text",
                           nullable=True),
    "stop": SamplingOption(stops(), (), "stop when one of these appears; not included in the text"),
}

# The options given as one value (every one but the list of stop strings).
SCALAR_SAMPLING = tuple(k for k in SAMPLING if k != "stop")


def sampling_defaults() -> dict[str, Any]:
    return {k: o.default for k, o in SAMPLING.items()}


def check_sampling(values: Mapping[str, Any]) -> list[str]:
    """Refusals ('temperature must be ...') of the given sampling values, in catalogue order."""
    problems = []
    for name, opt in SAMPLING.items():
        if name not in values or (values[name] is None and opt.nullable):
            continue
        try:
            if name == "stop" and isinstance(values[name], (list, tuple)):
                check_stops(list(values[name]))  # says which string breaks which rule
            else:
                opt.kind.value(values[name], from_text=False)
        except ValueError as e:
            problems.append(f"{name}: {e}" if name == "stop" else f"{name} {e}")
    return problems


def parse_sampling(name: str, text: str | None) -> Any:
    """A scalar sampling value from its typed form; 'none', 'default' or '' give None: not given,
    so the model's own default applies, else the catalogue's. ValueError."""
    opt = SAMPLING[name]
    if text is None or text.strip().lower() in ("none", "default", ""):
        return None
    try:
        return opt.kind.value(text)
    except ValueError as e:
        raise ValueError(f"{name} {e}") from None


def unescape(text: str) -> str:
    """A typed backslash-n or backslash-t becomes a newline or a tab (stop strings, prompts)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def add_sampling_arguments(parser: Any) -> None:
    """The sampling options as flags (--max-tokens, ..., --stop), for `cllm generate`, `cllm
    chat` and `cllmd generate`. The options not given stay None, so that only those given are
    sent: the model's own generation defaults apply to the rest, else the catalogue's."""
    import argparse

    def typed(name: str) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            try:
                return parse_sampling(name, text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        parse.__name__ = name
        return parse

    for name in SCALAR_SAMPLING:
        opt = SAMPLING[name]
        shown = "fresh each time" if opt.default is None else f"the model's, else {opt.default}"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=typed(name), default=None,
                            metavar=opt.kind.metavar, help=f"{opt.doc} (default {shown})")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when TEXT appears, which is left out of the text "
                             f"(repeatable, up to {MAX_STOPS}; \\n for a newline)")


def sampling_from_args(namespace: Any) -> dict[str, Any]:
    """The options add_sampling_arguments' flags gave (None ones left out), stop strings
    unescaped and checked; ValueError naming --stop."""
    opts = {k: getattr(namespace, k) for k in SCALAR_SAMPLING if getattr(namespace, k, None) is not None}
    try:
        stop = check_stops([unescape(t) for t in getattr(namespace, "stop", None) or []])
    except ValueError as e:
        raise ValueError(f"--stop: {e}") from None
    if stop:
        opts["stop"] = stop
    return opts
