"""The daemon's configuration: cllmd.toml (stdlib tomllib) overridden by flags.

The settings catalogue (cllm.catalogue.SETTINGS, here SCHEMA) drives everything: validation,
defaults, the flags of `cllmd serve` and `cllmd train` with their --help texts, and the
commented default configuration file (render_default_toml).
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

from cllm.catalogue import (  # noqa: F401  (re-exported: the kinds live with the catalogue)
    RENAMED, SECTIONS, SETTINGS, GiB, KiB, Kind, MiB, Setting, boolean, check_rules, choice,
    integer, names, number, renamed_error, size, text,
)


class SettingsError(Exception):
    """A configuration file or override is unreadable, has an unknown key or a bad value."""


SCHEMA: dict[str, Setting] = SETTINGS  # the settings catalogue (cllm/catalogue.py)
PATH_KEYS = frozenset(k for k, s in SETTINGS.items() if s.path)


def _section_class(section: str) -> type:
    fields = [(spec.name, type(spec.default), dataclasses.field(default=spec.default))
              for spec in SCHEMA.values() if spec.section == section]
    return dataclasses.make_dataclass(f"{section.capitalize()}Settings", fields, frozen=True)


# One frozen dataclass per section of the catalogue (a new section needs nothing here).
_SECTION_CLASSES: dict[str, type] = {section: _section_class(section) for section in SECTIONS}


class _SettingsBase:
    """All settings, one frozen dataclass per section: settings.train.lr."""

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


Settings = dataclasses.make_dataclass(
    "Settings", [(section, Any, dataclasses.field(default_factory=cls))
                 for section, cls in _SECTION_CLASSES.items()],
    bases=(_SettingsBase,), frozen=True)
Settings.__doc__ = _SettingsBase.__doc__


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
            renamed = renamed_error(key)
            if renamed:
                raise SettingsError(f"{origin}: {key}: {renamed}")
            raise SettingsError(f"{origin}: {key}: unknown key{_suggest(key)}")
        try:
            value = spec.kind.value(raw, from_text=from_text)
        except ValueError as e:
            raise SettingsError(f"{origin}: {key}: {e}") from None
        if key in PATH_KEYS and value:
            p = Path(value).expanduser()
            value = str(p if p.is_absolute() else (base or Path.cwd()) / p)
        values[key] = value
        origins[key] = origin


def _check_together(values: dict[str, Any], origins: dict[str, str]) -> None:
    broken = check_rules(values)
    if broken:
        key, reason = broken
        raise SettingsError(f"{origins[key]}: {key}: {reason}")


def _build(values: Mapping[str, Any]) -> "Settings":
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
# Command line: `cllmd serve` has one flag per key, --section-key-name; `cllmd train` one per
# offline setting, --key-name. Help texts and defaults come from the catalogue.


def flag_name(key: str) -> str:
    return SCHEMA[key].serve_flag


class _Renamed(argparse.Action):
    """A flag of a renamed key: refused with the message naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {renamed_error(self.dest)} "
                     f"({SCHEMA[RENAMED[self.dest][0]].serve_flag})")


def _help(spec: Setting, default_text: str | None = None) -> str:
    default = spec.kind.render(spec.default) if default_text is None else default_text
    return f"{spec.doc} (default: {default})".replace("%", "%%")


def _add_flag(group, flag: str, dest: str, spec: Setting, default: Any, help_text: str,
              typed: bool) -> None:
    if spec.kind.metavar == "BOOL":
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                           default=default, help=help_text)
        return
    kind = spec.kind

    def parse(text: str) -> Any:
        try:
            return kind.value(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = spec.name  # argparse names the type in its "invalid value" message
    group.add_argument(flag, dest=dest, metavar=kind.metavar, default=default, help=help_text,
                       **({"type": parse} if typed else {}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one override flag per setting (e.g. --train-lr) to `parser` (`cllmd serve`)."""
    for section in SECTIONS:
        group = parser.add_argument_group(f"[{section}] settings (override cllmd.toml)")
        for key, spec in SCHEMA.items():
            if spec.section == section:
                # values stay text here: load_settings checks them, naming the key and origin
                _add_flag(group, spec.serve_flag, key, spec, argparse.SUPPRESS, _help(spec),
                          typed=False)
    for old in RENAMED:
        parser.add_argument("--" + old.replace(".", "-").replace("_", "-"), dest=old, nargs="?",
                            action=_Renamed, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_offline_arguments(parser: argparse.ArgumentParser, section: str,
                          defaults: Mapping[str, str] | None = None) -> None:
    """`cllmd train`'s flags (--lr, --n-layer, ...) for the offline settings of one section:
    values checked by the setting's kind, defaults from the catalogue. `defaults` gives the
    help text of a default decided by the command instead (name -> text; the value is None)."""
    group = parser.add_argument_group(f"{section} (as [{section}] in cllmd.toml)")
    defaults = defaults or {}
    for spec in SCHEMA.values():
        if spec.offline and spec.section == section:
            own = spec.name in defaults
            _add_flag(group, spec.train_flag, spec.name, spec, None if own else spec.default,
                      _help(spec, defaults.get(spec.name)), typed=True)


def offline_values(namespace: argparse.Namespace, section: str) -> dict[str, Any]:
    """The values of add_offline_arguments' flags: {name: value} (None: decided by the command)."""
    return {s.name: getattr(namespace, s.name) for s in SCHEMA.values()
            if s.offline and s.section == section}


def overrides_from_args(namespace: argparse.Namespace) -> dict[str, Any]:
    """The keys given on the command line, ready for load_settings(overrides=...)."""
    return {key: getattr(namespace, key) for key in SCHEMA if hasattr(namespace, key)}


def keys(section: str | None = None) -> Iterable[str]:
    """The dotted keys, optionally of one section only."""
    return [k for k in SCHEMA if section is None or k.startswith(section + ".")]


def render_docs_table() -> str:
    """The settings table of docs/service.md: every key, its default, bounds, unit, stage."""
    rows = ["| key | default | must be | unit | read by | runtime | meaning |",
            "|---|---|---|---|---|---|---|"]
    for spec in SCHEMA.values():
        cells = (f"`{spec.key}`", f"`{spec.kind.render(spec.default)}`", spec.kind.describe,
                 spec.unit, spec.applies, "yes" if spec.runtime else "", spec.doc)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    # `python -m cllmd.settings > systemd/cllmd.toml` regenerates the shipped default file,
    # `python -m cllmd.settings --docs` the settings table of docs/service.md.
    import sys

    sys.stdout.write(render_docs_table() if sys.argv[1:] == ["--docs"] else render_default_toml())
