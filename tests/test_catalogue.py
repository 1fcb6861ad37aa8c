"""The catalogues (cllm/catalogue.py) against every surface derived from them: TOML keys, the
flags of `cllmd serve` and `cllmd train`, the protocol's specs, the client's keys and flags,
TrainConfig, the controller, SamplingOptions and the docs tables."""
from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from cllm import catalogue
from cllm.catalogue import SAMPLING, SCALAR_SAMPLING, SETTINGS, runtime_settings
from tests.daemonproc import daemon  # noqa: F401 (fixture)

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _parser_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: a for a in parser._actions for flag in a.option_strings}


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def test_catalogue_every_setting_on_every_surface(tmp_path):
    from cllm.cli import TRAIN_KEYS
    from cllmd import settings as st
    from cllmd.cli import build_parser as cllmd_parser
    from cllmd.daemon import build_parser as serve_parser
    from cllmd.protocol import OP_SPECS
    from cllmd.trainer import TrainConfig
    from cllmd.controller import CONFIG_KEYS, CONTROLLER_KEYS, TRAINER_KEYS, ControllerSettings

    serve = _parser_actions(serve_parser())
    train = _parser_actions(_subparser(cllmd_parser(), "train"))
    set_spec = OP_SPECS["train.config.set"].fields
    toml_text = st.render_default_toml()
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    controller_fields = {f.name: f for f in dataclasses.fields(ControllerSettings)}
    for key, s in SETTINGS.items():
        # the TOML key: in the shipped default file, and a file setting it is read back
        assert f"\n#{s.name} = {s.kind.render(s.default)}\n" in toml_text, key
        path = tmp_path / f"{key}.toml"
        path.write_text(f"[{s.section}]\n{s.name} = {s.kind.render(s.default)}\n")
        assert st.load_settings(path).get(key) == s.default, key
        # the `cllmd serve` flag
        assert serve[s.serve_flag].dest == key, key
        assert s.doc.replace("%", "%%") in serve[s.serve_flag].help, key
        # the `cllmd train` flag, with the catalogue's default unless the command decides it
        if s.offline:
            flag = train[s.train_flag]
            assert flag.dest == s.name and flag.default in (s.default, None), key
        # train.config.get/set, the client's `cllm train config`, the controller's keys
        if s.runtime:
            f = set_spec[s.name]
            assert (f.type, f.lo, f.hi, f.lo_open) == (s.kind.wire, s.kind.lo, s.kind.hi, s.kind.lo_open), key
            assert TRAIN_KEYS[s.name] is s.kind and s.name in CONFIG_KEYS, key
            assert s.name in (TRAINER_KEYS if s.applies == "trainer" else CONTROLLER_KEYS), key
        else:
            assert s.name not in set_spec and s.name not in TRAIN_KEYS, key
        # where it applies: TrainConfig's and the controller's fields take the catalogue's default
        if s.applies == "trainer":
            assert train_fields[s.name].default == s.default, key
        if s.applies == "controller" and s.name != "threads":
            assert controller_fields[s.name].default == s.default, key
    assert set(set_spec) == {s.name for s in runtime_settings()} == set(CONFIG_KEYS)


def test_catalogue_protocol_bounds_agree_with_the_kinds():
    from cllmd.protocol import OP_SPECS, ProtocolError, validate_args
    spec = OP_SPECS["train.config.set"]
    for s in runtime_settings():
        assert validate_args(spec, {s.name: s.default}, "train.config.set")[s.name] == s.default
        if s.kind.hi is not None:
            too_big = s.kind.hi * 2 + 1
            with pytest.raises(ProtocolError):
                validate_args(spec, {s.name: too_big}, "train.config.set")
            with pytest.raises(ValueError):
                s.kind.value(too_big, from_text=False)
    with pytest.raises(ProtocolError, match="replay_fraction' must be a number >= 0 and < 1"):
        validate_args(spec, {"replay_fraction": 1.0}, "train.config.set")


def test_catalogue_renamed_key_refused_naming_the_new_one(tmp_path):
    from cllm.cli import UsageError, parse_setting
    from cllmd.protocol import OP_SPECS, ProtocolError, validate_args
    from cllmd.settings import SettingsError, load_settings
    path = tmp_path / "old.toml"
    path.write_text("[train]\ndecay_steps = 3000\n")
    with pytest.raises(SettingsError, match=r"train\.decay_steps: renamed to train\.decay_end_step: .*warmup \+"):
        load_settings(path)
    with pytest.raises(ProtocolError, match="'decay_steps' renamed to decay_end_step"):
        validate_args(OP_SPECS["train.config.set"], {"decay_steps": 3000}, "train.config.set")
    with pytest.raises(UsageError, match="decay_steps renamed to decay_end_step"):
        parse_setting("decay_steps=3000")


def test_catalogue_min_lr_rule_written_once():
    from cllmd.settings import SettingsError, load_settings
    from cllmd.trainer import TrainConfig
    with pytest.raises(ValueError, match=r"min_lr must be <= lr \(0\.001\)"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(SettingsError, match=r"train\.min_lr: must be <= train\.lr \(0\.001\)"):
        load_settings(None, {"train.min_lr": 1e-2})
    assert catalogue.check_section("train", {"lr": 1e-3, "min_lr": 1e-2}) == \
        "min_lr must be <= lr (0.001), got 0.01"


def test_catalogue_checkpoint_with_the_old_decay_key_still_loads():
    from cllmd.trainer import TrainConfig
    old = dataclasses.asdict(TrainConfig())
    old["decay_steps"] = old.pop("decay_end_step") + 1
    assert TrainConfig.from_dict(old).decay_end_step == TrainConfig().decay_end_step + 1


def test_catalogue_sampling_defaults_agree_across_entry_points():
    from cllm.chat import SAMPLING as CHAT
    from cllm.cli import build_parser as cllm_parser
    from cllmd.cli import build_parser as cllmd_parser
    from cllmd.generate import SamplingOptions
    from cllmd.protocol import OP_SPECS

    opts = SamplingOptions()
    spec = OP_SPECS["generate"].fields
    cllmd_generate = _parser_actions(_subparser(cllmd_parser(), "generate"))
    cllm = cllm_parser()
    surfaces = {name: _parser_actions(_subparser(cllm, name)) for name in ("generate", "chat")}
    for name, opt in SAMPLING.items():
        default = opt.default
        assert getattr(opts, name) == (tuple(default) if name == "stop" else default), name
        # nil when not given, so the daemon can apply the model's own generation defaults first
        assert spec[name].default == ([] if name == "stop" else None), name
        if name == "stop":
            continue
        flag = "--" + name.replace("_", "-")
        assert CHAT[name] is opt, name
        # every entry point sends (or uses) only what was given, and --help says what applies
        shown = "fresh each time" if default is None else f"the model's, else {default}"
        for actions in (*surfaces.values(), cllmd_generate):
            assert actions[flag].default is None, name
            assert f"(default {shown})" in actions[flag].help, name
    assert SamplingOptions(min_p=1.0).min_p == 1.0  # 0 .. 1, as docs/protocol.md says
    assert set(SCALAR_SAMPLING) | {"stop"} == set(SAMPLING)


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows of the first markdown table after `heading`, cells stripped of backticks."""
    start = text.index(heading)
    rows = []
    lines = text[start:].splitlines()
    for line in lines if heading.startswith("|") else lines[1:]:
        if line.startswith("|"):
            cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
            if not set(cells[0]) <= {"-"}:
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # without the header row


def test_catalogue_docs_tables_agree_with_the_code():
    protocol = (DOCS / "protocol.md").read_text()
    # train.config.set: every runtime setting, its type and its bounds
    rows = {r[0]: r for r in _table(protocol, "### `train.config.set`")}
    assert set(rows) == {s.name for s in runtime_settings()}
    wire_names = {float: "float", int: "int", bool: "bool"}
    for s in runtime_settings():
        name, typ, bounds, meaning = rows[s.name]
        assert (typ, bounds) == (wire_names[s.kind.wire], s.kind.describe), s.name
    # generate: the sampling options' defaults
    gen = {r[0]: r for r in _table(protocol, "### `generate`")}
    def bound(x):
        return "2⁶⁴−1" if x == 2**64 - 1 else catalogue.plain_number(x)

    for name, opt in SAMPLING.items():
        shown = {None: "nil", (): "[]"}.get(opt.default, f"the model's, else {opt.default}")
        assert gen[name][2] == shown, name
        if name != "stop":  # the bounds column: "> 0 .. 1", "0 .. 2147483647"
            k = opt.kind
            assert gen[name][3] == f"{'> ' if k.lo_open else ''}{bound(k.lo)} .. {bound(k.hi)}", name
    # docs/cli.md's option table of cllm generate
    cli = (DOCS / "cli.md").read_text()
    flags = {re.sub(r" .*", "", r[0]): r for r in _table(cli, "| option | default | meaning |")}
    for name in SCALAR_SAMPLING:
        default = SAMPLING[name].default
        cell = flags["--" + name.replace("_", "-")][1]
        assert cell.split(" ")[0] == ("fresh" if default is None else f"{default:g}"), name


def test_catalogue_shipped_toml_is_read_as_the_defaults():
    from cllmd.settings import Settings, load_settings
    shipped = Path(__file__).resolve().parent.parent / "systemd" / "cllmd.toml"
    assert tomllib.loads(shipped.read_text()) == {s: {} for s in catalogue.SECTIONS}
    assert load_settings(shipped) == Settings()


def test_catalogue_train_config_get_goes_back_through_set(daemon):  # noqa: F811
    d = daemon("--no-train-auto-train", "--train-threads", "1")
    c = d.client
    got = c.request("train.config.get")
    assert set(got) == {s.name for s in runtime_settings()}
    result = c.request("train.config.set", **got)
    assert result["config"] == got
    assert c.request("train.config.get") == got
    # a change, then the whole map again: still accepted, still unchanged
    c.request("train.config.set", lr=5e-4, min_lr=5e-5, decay_end_step=777, snapshot_interval=7)
    changed = c.request("train.config.get")
    assert (changed["lr"], changed["decay_end_step"], changed["snapshot_interval"]) == (5e-4, 777, 7)
    assert c.request("train.config.set", **changed)["config"] == changed


def _other_value(s):
    """A valid value of a runtime setting other than its default."""
    if s.kind.wire is bool:
        return not s.default
    if s.kind.wire is int:
        return s.default + 1 if s.kind.hi is None or s.default + 1 <= s.kind.hi else s.default - 1
    return s.default / 2 if s.default else 0.5


def test_catalogue_reload_applies_every_runtime_setting_from_the_file(daemon, tmp_path):  # noqa: F811
    import signal

    from cllmd.settings import load_settings
    from tests.daemonproc import QUICK, wait_for
    given = {a[len("--train-"):].replace("-", "_") for a in QUICK if a.startswith("--train-")}
    config = tmp_path / "cllmd.toml"
    config.write_text("[train]\nauto_train = false\n")
    d = daemon("--config", str(config))
    before = d.client.request("train.config.get")
    changed = {s.name: _other_value(s) for s in runtime_settings() if s.name not in given}
    changed["auto_train"] = True  # the file said false: back to the default is a change too
    config.write_text("[train]\n" + "".join(f"{k} = {SETTINGS['train.' + k].kind.render(v)}\n"
                                            for k, v in changed.items()))
    load_settings(config)  # a valid file, min_lr <= lr included
    d.proc.send_signal(signal.SIGHUP)
    after = wait_for(lambda: (c := d.client.request("train.config.get"))["auto_train"] and c, 30, "the reload")
    for name, value in changed.items():
        assert after[name] == pytest.approx(value), name
    for name in given:  # the command line still beats the file
        assert after[name] == before[name], name


def test_catalogue_service_docs_table_is_current():
    from cllmd.settings import render_docs_table
    text = (DOCS / "service.md").read_text()
    assert render_docs_table() in text, "regenerate docs/service.md's table: python -m cllmd.settings --docs"


def test_catalogue_state_dir_with_an_old_checkpoint_still_resumes(daemon, tmp_path):  # noqa: F811
    """A checkpoint written before decay_steps became decay_end_step: the daemon resumes it."""
    import numpy as np

    from cllmd.model import Model, ModelConfig
    from cllmd.modelfile import read_model_file, write_model_file
    from cllmd.tokenizer import BytesTokenizer
    from cllmd.tokensource import TokenArraySource
    from cllmd.trainer import TrainConfig, Trainer
    tokens = np.frombuffer(b"all the world's a stage, and all the men and women merely players. " * 40,
                           dtype=np.uint8).astype(np.uint32)
    model = Model(ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=32, block_size=32), seed=0,
                  tokenizer=BytesTokenizer())
    trainer = Trainer(model, TokenArraySource(tokens), TrainConfig(batch_size=2, decay_end_step=50), threads=1)
    for _ in range(3):
        trainer.step()
    path = tmp_path / "state" / "checkpoints" / "latest.cllm"
    path.parent.mkdir(parents=True)
    trainer.save_checkpoint(path)
    trainer.close()
    header, tensors = read_model_file(path)
    meta = header["metadata"]
    config = meta["checkpoint"]["train_config"]
    config["decay_steps"] = config.pop("decay_end_step")  # as the old trainer wrote it
    write_model_file(path, {k: np.asarray(v) for k, v in tensors.items()}, config=header["config"],
                     tokenizer=header["tokenizer"], metadata=meta)
    assert "decay_steps" in read_model_file(path)[0]["metadata"]["checkpoint"]["train_config"]
    d = daemon("--no-train-auto-train", model=False)
    assert d.client.request("train.status")["step"] == 3
    assert d.client.request("train.config.get")["decay_end_step"] == SETTINGS["train.decay_end_step"].default


def test_catalogue_entries_are_well_formed():
    for key, s in SETTINGS.items():
        assert s.applies in catalogue.APPLIES, key
        assert s.section in catalogue.SECTIONS and s.doc and s.doc == s.doc.strip().rstrip("."), key
        assert not s.runtime or s.section == "train", key  # train.config.* serves [train] only
        assert s.kind.check(s.default) == s.default, key   # the default passes its own kind
        assert key not in catalogue.RENAMED, key
    for old, (new, how) in catalogue.RENAMED.items():
        assert new in SETTINGS and how, old
    # the fine-tuning defaults: a model's own settings, each within its bounds, the rules kept
    assert set(catalogue.FINETUNE) <= set(catalogue.MODEL_SETTINGS)
    assert "threads" not in catalogue.MODEL_SETTINGS
    assert catalogue.check_section("train", {**{s.name: s.default for s in runtime_settings()},
                                             **catalogue.FINETUNE}) is None
    for name, value in catalogue.FINETUNE.items():
        assert SETTINGS[f"train.{name}"].kind.check(value) == value != SETTINGS[f"train.{name}"].default, name
    for name, opt in SAMPLING.items():
        if opt.default is None:
            assert opt.nullable, name
        else:
            assert opt.kind.check(opt.default) == opt.default, name
