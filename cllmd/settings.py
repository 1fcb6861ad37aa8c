"""The daemon's configuration: cllmd.toml (stdlib tomllib) overridden by flags.

One schema table, SCHEMA, drives everything: validation, defaults, the --help texts and the
commented default configuration file (render_default_toml).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


class SettingsError(Exception):
    """A configuration file or override is unreadable, has an unknown key or a bad value."""


# --------------------------------------------------------------------------------------------
# Kinds of values. A kind checks (and normalizes) a value coming from TOML or Python, parses the
# text of a command-line flag, and renders a value as TOML. `describe` completes the sentence
# "must be ...", so every refusal reads the same way.


@dataclass(frozen=True)
class Kind:
    describe: str
    check: Callable[[Any], Any]  # normalized value, or raises ValueError
    parse: Callable[[str], Any] | None  # command-line text -> value; None = strings pass through
    render: Callable[[Any], str]
    metavar: str


def _toml_str(value: str) -> str:
    # A TOML basic string takes JSON's escapes; \uXXXX keeps the file pure ASCII.
    return json.dumps(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def boolean() -> Kind:
    words = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}

    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise ValueError
        return v

    def parse(text: str) -> bool:
        try:
            return words[text.strip().lower()]
        except KeyError:
            raise ValueError from None

    return Kind("true or false", check, parse, lambda v: "true" if v else "false", "BOOL")


def integer(lo: int, hi: int | None = None) -> Kind:
    describe = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def check(v: Any) -> int:
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            raise ValueError
        return v

    return Kind(describe, check, lambda t: int(t.strip()), str, "N")


def number(*, gt: float | None = None, ge: float | None = None, lt: float | None = None) -> Kind:
    bounds = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else "",
              f"< {lt:g}" if lt is not None else ""]
    describe = "a number " + " and ".join(b for b in bounds if b)

    def check(v: Any) -> float:
        if not (_is_int(v) or isinstance(v, float)):
            raise ValueError
        x = float(v)
        if (not math.isfinite(x) or (gt is not None and x <= gt) or (ge is not None and x < ge)
                or (lt is not None and x >= lt)):
            raise ValueError
        return x

    return Kind(describe.strip(), check, lambda t: float(t.strip()), repr, "X")


def choice(*options: str) -> Kind:
    describe = "one of " + ", ".join(repr(o) for o in options)

    def check(v: Any) -> str:
        if v not in options or not isinstance(v, str):
            raise ValueError
        return v

    return Kind(describe, check, None, _toml_str, "{" + ",".join(options) + "}")


def text(describe: str = "a string", pattern: str | None = None) -> Kind:
    rx = re.compile(pattern) if pattern else None

    def check(v: Any) -> str:
        if not isinstance(v, str) or (rx is not None and not rx.fullmatch(v)):
            raise ValueError
        return v

    return Kind(describe, check, None, _toml_str, "TEXT")


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

    return Kind(describe, check, None, render, "SIZE")


def names() -> Kind:
    def check(v: Any) -> tuple[str, ...]:
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
            raise ValueError
        return tuple(v)

    def parse(t: str) -> tuple[str, ...]:
        return tuple(s.strip() for s in t.split(",") if s.strip())

    return Kind("a non-empty list of non-empty strings", check, parse,
                lambda v: "[" + ", ".join(_toml_str(s) for s in v) + "]", "A,B,...")


# tcp://host:port with a name, an IPv4 address, '*' or a bracketed IPv6 address.
_TCP = r"|tcp://(\*|[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):([1-9][0-9]{0,4})"


@dataclass(frozen=True)
class Key:
    kind: Kind
    default: Any
    doc: str


PATH_KEYS = frozenset({"server.curve_secret_key_file", "server.curve_authorized_keys_dir"})

# The schema: "section.key" -> (kind, default, one-line doc). Defaults are sized for a small
# model that visibly learns within minutes on 2 cores.
SCHEMA: dict[str, Key] = {
    # [server]
    "server.tcp": Key(text('"" or "tcp://HOST:PORT"', _TCP), "",
                      'also listen on TCP, e.g. "tcp://127.0.0.1:5555"; requires both CURVE '
                      'settings below; "" = IPC sockets only'),
    "server.curve_secret_key_file": Key(text("a path"), "",
                                        "the server's CURVE secret key file (zmq.auth format); "
                                        "relative paths are taken from this file's directory"),
    "server.curve_authorized_keys_dir": Key(text("a path"), "",
                                            "directory of the CURVE public keys of the clients "
                                            "allowed over TCP"),
    "server.max_message_bytes": Key(size(4 * KiB), 16 * MiB,
                                    "largest request accepted; bigger ones are refused"),
    "server.generate_workers": Key(integer(1, 64), 2, "generations that run at the same time"),
    "server.max_pending_generations": Key(integer(0, 10_000), 8,
                                          "generations that may wait for a worker; beyond "
                                          'this, requests get "busy"'),
    "server.stream_timeout": Key(number(gt=0), 30.0,
                                 "seconds a streamed generation waits for a client that stopped "
                                 "reading before it is cancelled"),
    "server.events_interval": Key(number(gt=0), 1.0,
                                  "seconds between trainer statistics events on the PUB socket"),
    # [model]: used only to create the default model on first start.
    "model.tokenizer": Key(choice("bpe", "bytes"), "bpe",
                           "byte-level BPE trained on the default corpus, or plain bytes"),
    "model.vocab_size": Key(integer(257, 1 << 20), 4096, "BPE vocabulary size (ignored for bytes)"),
    "model.n_layer": Key(integer(1, 64), 4, "transformer blocks"),
    "model.n_head": Key(integer(1, 64), 4, "attention heads per block"),
    "model.n_embd": Key(integer(8, 8192), 128, "embedding width; a multiple of n_head"),
    "model.block_size": Key(integer(8, 65536), 128, "context length in tokens"),
    "model.init": Key(choice("normal", "lattice"), "normal",
                      "token-embedding initialisation: GPT-2's normal(0, 0.02) or the "
                      "prime/golden-angle lattice"),
    "model.clock_positions": Key(boolean(), False,
                                 "add 12-periodic angle features to the position embedding"),
    # [train]: every key can also be changed at run time with train.config.set.
    "train.auto_train": Key(boolean(), True, "train whenever new tokens arrive in the data store"),
    "train.threads": Key(integer(0, 12), 0, "sphere worker threads: 0 = the usable cores, else 1 to 12"),
    "train.batch_size": Key(integer(1, 4096), 12, "sequences per step, split over the 12 spheres"),
    "train.lr": Key(number(gt=0), 1e-3, "peak learning rate (AdamW)"),
    "train.min_lr": Key(number(ge=0), 1e-4, "learning rate at the end of the cosine decay; <= lr"),
    "train.warmup": Key(integer(0), 100, "steps of linear warmup from 0 to lr"),
    "train.decay_steps": Key(integer(1), 5000, "steps of cosine decay from lr to min_lr after warmup"),
    "train.grad_clip": Key(number(ge=0), 1.0, "clip the global gradient norm to this; 0 = no clipping"),
    "train.weight_decay": Key(number(ge=0), 0.1, "AdamW decoupled weight decay"),
    "train.eval_interval": Key(integer(0), 200, "steps between validation evaluations; 0 = never"),
    "train.checkpoint_interval_steps": Key(integer(0), 500,
                                           "write a checkpoint every this many steps; 0 = not by steps"),
    "train.checkpoint_interval_seconds": Key(number(ge=0), 300.0,
                                             "write a checkpoint at least this often while "
                                             "training; 0 = not by time"),
    "train.snapshot_interval": Key(integer(1), 20,
                                   "publish the weights to inference every this many steps"),
    "train.seed": Key(integer(0, 2**32 - 1), 1337, "random seed for initialisation and batch sampling"),
    "train.grad_checkpointing": Key(boolean(), False,
                                    "recompute each block's activations in the backward pass: "
                                    "60-74% less activation memory, 12-17% slower steps"),
    "train.auto_epochs": Key(number(gt=0), 1.0,
                             "auto-training budget: passes over the newly arrived tokens"),
    "train.replay_fraction": Key(number(ge=0, lt=1), 0.25,
                                 "share of each auto-training batch replayed from older data, so "
                                 "earlier knowledge is not forgotten"),
    # [queue]
    "queue.max_file_bytes": Key(size(1), 64 * MiB, "larger queued files are refused into failed/"),
    "queue.max_attempts": Key(integer(1, 100), 3,
                              "ingestion attempts of a file before it goes to failed/"),
    "queue.rescan_seconds": Key(number(gt=0), 30.0,
                                "full rescan of incoming/ this often, besides inotify"),
    "queue.json_fields": Key(names(), ("text", "content", "body"),
                             "JSON/JSONL fields taken as a record's text, in order of preference; "
                             "records without one contribute all their string values"),
    # [log]
    "log.level": Key(choice("debug", "info", "warning", "error", "critical"), "info",
                     "lowest level of the log lines written to stderr"),
}

SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(k.split(".", 1)[0] for k in SCHEMA))


def _section_class(section: str) -> type:
    fields = []
    for key, spec in SCHEMA.items():
        sec, name = key.split(".", 1)
        if sec == section:
            fields.append((name, type(spec.default), dataclasses.field(default=spec.default)))
    return dataclasses.make_dataclass(f"{section.capitalize()}Settings", fields, frozen=True)


ServerSettings = _section_class("server")
ModelSettings = _section_class("model")
TrainSettings = _section_class("train")
QueueSettings = _section_class("queue")
LogSettings = _section_class("log")
_SECTION_CLASSES = {"server": ServerSettings, "model": ModelSettings, "train": TrainSettings,
                    "queue": QueueSettings, "log": LogSettings}
assert set(_SECTION_CLASSES) == set(SECTIONS)


@dataclass(frozen=True)
class Settings:
    """All settings, one frozen dataclass per section: settings.train.lr."""

    server: Any = dataclasses.field(default_factory=ServerSettings)
    model: Any = dataclasses.field(default_factory=ModelSettings)
    train: Any = dataclasses.field(default_factory=TrainSettings)
    queue: Any = dataclasses.field(default_factory=QueueSettings)
    log: Any = dataclasses.field(default_factory=LogSettings)

    def get(self, key: str) -> Any:
        """The value of a dotted key, e.g. get("train.lr")."""
        if key not in SCHEMA:
            raise KeyError(f"unknown setting {key!r}")
        section, name = key.split(".", 1)
        return getattr(getattr(self, section), name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict ({"train": {"lr": ...}}); tuples become lists (msgpack/JSON ready)."""
        out: dict[str, dict[str, Any]] = {}
        for key in SCHEMA:
            section, name = key.split(".", 1)
            value = self.get(key)
            out.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, overrides: Mapping[str, Any], origin: str = "override") -> "Settings":
        """A new Settings with `overrides` (dotted keys) applied and validated together.

        Used for run-time changes (train.config.set) and reloads; raises SettingsError.
        """
        values = {k: self.get(k) for k in SCHEMA}
        origins = {k: "settings" for k in SCHEMA}
        _apply(values, origins, overrides, origin, base=None)
        _check_together(values, origins)
        return _build(values)


def validate(key: str, value: Any, origin: str = "override") -> Any:
    """Check one value against the schema and return it normalized; raises SettingsError."""
    values: dict[str, Any] = {}
    _apply(values, {}, {key: value}, origin, base=None)
    return values[key]


def _apply(values: dict[str, Any], origins: dict[str, str], items: Mapping[str, Any],
           origin: str, base: Path | None, from_text: bool = True) -> None:
    # from_text: overrides may arrive as flag text ("3e-4"); a TOML file has real types, and
    # lr = "3e-4" there is refused rather than guessed.
    for key, raw in items.items():
        spec = SCHEMA.get(key)
        if spec is None:
            raise SettingsError(f"{origin}: {key}: unknown key{_suggest(key)}")
        value = raw
        try:
            if from_text and isinstance(raw, str) and spec.kind.parse is not None:
                value = spec.kind.parse(raw)
            value = spec.kind.check(value)
        except (ValueError, TypeError, OverflowError):
            raise SettingsError(f"{origin}: {key}: must be {spec.kind.describe}, got {raw!r}") from None
        if key in PATH_KEYS and value:
            p = Path(value).expanduser()
            value = str(p if p.is_absolute() else (base or Path.cwd()) / p)
        values[key] = value
        origins[key] = origin


def _check_together(values: dict[str, Any], origins: dict[str, str]) -> None:
    def fail(key: str, reason: str) -> None:
        raise SettingsError(f"{origins[key]}: {key}: {reason}")

    if values["train.min_lr"] > values["train.lr"]:
        fail("train.min_lr", f"must be <= train.lr ({values['train.lr']!r}), "
                             f"got {values['train.min_lr']!r}")
    if values["model.n_embd"] % values["model.n_head"]:
        fail("model.n_embd", f"must be a multiple of model.n_head ({values['model.n_head']}), "
                             f"got {values['model.n_embd']}")
    if values["server.tcp"]:
        for key in ("server.curve_secret_key_file", "server.curve_authorized_keys_dir"):
            if not values[key]:
                fail("server.tcp", f"TCP is only served with CURVE encryption: {key} must be set")


def _build(values: Mapping[str, Any]) -> Settings:
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in values.items():
        section, name = key.split(".", 1)
        per_section[section][name] = value
    return Settings(**{s: _SECTION_CLASSES[s](**kv) for s, kv in per_section.items()})


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(SCHEMA), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def load_settings(path: Path | None, overrides: Mapping[str, Any] | None = None, *,
                  overrides_origin: str = "command line") -> Settings:
    """Defaults < the TOML file at `path` (if any) < `overrides` ({"train.lr": 3e-4} or "3e-4")."""
    values = {k: spec.default for k, spec in SCHEMA.items()}
    origins = {k: "defaults" for k in SCHEMA}
    if path is not None:
        origin = str(path)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise SettingsError(f"{origin}: cannot read: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"{origin}: not valid TOML: {e}") from e
        except UnicodeDecodeError as e:
            raise SettingsError(f"{origin}: not valid TOML: not UTF-8 at byte {e.start}") from e
        _apply(values, origins, _flatten(doc, origin), origin,
               base=Path(path).absolute().parent, from_text=False)
    if overrides:
        _apply(values, origins, overrides, overrides_origin, base=None)
    _check_together(values, origins)
    return _build(values)


def _flatten(doc: Mapping[str, Any], origin: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if section not in SECTIONS:
            known = ", ".join(f"[{s}]" for s in SECTIONS)
            what = "section" if isinstance(table, dict) else "key outside any section"
            raise SettingsError(f"{origin}: {section}: unknown {what} (known sections: {known})")
        if not isinstance(table, dict):
            raise SettingsError(f"{origin}: {section}: must be a table [{section}], got {table!r}")
        for name, value in table.items():
            flat[f"{section}.{name}"] = value
    return flat


def render_default_toml() -> str:
    """The default cllmd.toml: every section, every key commented out at its default."""
    lines = [
        "# cllmd configuration (/etc/cllmd/cllmd.toml, or `cllmd --config FILE`).",
        "# Every key is shown commented out with its default value: uncomment to change it.",
        "# Command-line flags override this file; unknown keys and bad values stop the daemon",
        "# at start with the key and the reason. Sizes take an integer of bytes or a string",
        '# such as "64MiB".',
    ]
    current = None
    for key, spec in SCHEMA.items():
        section, name = key.split(".", 1)
        if section != current:
            lines += ["", f"[{section}]"]
            current = section
        doc = spec.doc[0].upper() + spec.doc[1:]
        lines += textwrap.wrap(f"{doc}. Must be {spec.kind.describe}.", width=99,
                               initial_indent="# ", subsequent_indent="# ")
        lines.append(f"#{name} = {spec.kind.render(spec.default)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line: one flag per key, --section-key-name, help text from the schema.


def flag_name(key: str) -> str:
    return "--" + key.replace(".", "-").replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one override flag per schema key (e.g. --train-lr) to `parser`."""
    for section in SECTIONS:
        group = parser.add_argument_group(f"[{section}] settings (override cllmd.toml)")
        for key, spec in SCHEMA.items():
            if not key.startswith(section + "."):
                continue
            help_text = f"{spec.doc} (default: {spec.kind.render(spec.default)})"
            help_text = help_text.replace("%", "%%")
            if spec.kind.metavar == "BOOL":
                group.add_argument(flag_name(key), dest=key, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(flag_name(key), dest=key, metavar=spec.kind.metavar,
                                   default=argparse.SUPPRESS, help=help_text)


def overrides_from_args(namespace: argparse.Namespace) -> dict[str, Any]:
    """The keys given on the command line, ready for load_settings(overrides=...)."""
    return {key: getattr(namespace, key) for key in SCHEMA if hasattr(namespace, key)}


def keys(section: str | None = None) -> Iterable[str]:
    """The dotted keys, optionally of one section only."""
    return [k for k in SCHEMA if section is None or k.startswith(section + ".")]


if __name__ == "__main__":
    # `python -m cllmd.settings > systemd/cllmd.toml` regenerates the shipped default file.
    import sys

    sys.stdout.write(render_default_toml())
