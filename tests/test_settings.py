"""The TOML configuration: schema defaults, file and flag overrides, refusals, the default file."""

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from cllmd import settings as st
from cllmd.settings import SCHEMA, Settings, SettingsError, load_settings, render_default_toml


def write(tmp_path, text, name="cllmd.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_settings_defaults_follow_schema():
    s = load_settings(None, {})
    for key, spec in SCHEMA.items():
        assert s.get(key) == spec.default, key
    assert s.train.lr == 1e-3 and s.queue.max_file_bytes == 64 * 2**20
    assert s.server.max_message_bytes == 16 * 2**20 and s.train.threads == 0
    assert s == Settings()


def test_settings_file_then_overrides(tmp_path):
    path = write(tmp_path, """
[train]
lr = 3e-4
batch_size = 24
auto_train = false
[queue]
max_file_bytes = "1MiB"
json_fields = ["body"]
[model]
tokenizer = "bytes"
""")
    s = load_settings(path, {"train.batch_size": "48", "train.grad_clip": 0.5})
    assert s.train.lr == 3e-4 and s.train.auto_train is False
    assert s.train.batch_size == 48  # the flag beats the file
    assert s.train.grad_clip == 0.5
    assert s.queue.max_file_bytes == 2**20 and s.queue.json_fields == ("body",)
    assert s.model.tokenizer == "bytes"


def test_settings_refuses_bad_value_naming_file_key_and_reason(tmp_path):
    path = write(tmp_path, '[train]\nlr = "fast"\n')
    with pytest.raises(SettingsError) as e:
        load_settings(path, {})
    assert str(e.value) == f"{path}: train.lr: must be a number > 0 and <= 1, got 'fast'"


@pytest.mark.parametrize("body, key, reason", [
    ('[train]\nlr = "1e-3"', "train.lr", "must be a number > 0"),  # strings are not numbers in a file
    ("[train]\nlr = 0", "train.lr", "must be a number > 0"),
    ("[train]\nlr = nan", "train.lr", "must be a number > 0"),
    ("[train]\nthreads = 13", "train.threads", "must be an integer from 0 to 12"),
    ("[train]\nthreads = true", "train.threads", "must be an integer from 0 to 12"),
    ("[train]\nbatch_size = 2.0", "train.batch_size", "must be an integer from 1 to 4096"),
    ("[train]\nauto_train = 1", "train.auto_train", "must be true or false"),
    ('[model]\ntokenizer = "wordpiece"', "model.tokenizer", "must be one of 'bpe', 'bytes'"),
    ('[queue]\nmax_file_bytes = "64MB"', "queue.max_file_bytes", "must be a size >= 1 bytes"),
    ("[queue]\njson_fields = []", "queue.json_fields", "must be a non-empty list"),
    ('[server]\ntcp = "http://x:1"', "server.tcp", 'must be "" or "tcp://HOST:PORT"'),
    ('[log]\nlevel = "loud"', "log.level", "must be one of 'debug'"),
])
def test_settings_refuses_bad_values(tmp_path, body, key, reason):
    path = write(tmp_path, body + "\n")
    with pytest.raises(SettingsError, match=re.escape(f"{path}: {key}: {reason}")):
        load_settings(path, {})


def test_settings_refuses_unknown_sections_and_keys(tmp_path):
    with pytest.raises(SettingsError, match=r"train\.lrate: unknown key \(did you mean train\.lr\?\)"):
        load_settings(write(tmp_path, "[train]\nlrate = 1.0\n"), {})
    with pytest.raises(SettingsError, match=r"trainer: unknown section \(known sections: \[server\]"):
        load_settings(write(tmp_path, "[trainer]\nlr = 1.0\n"), {})
    with pytest.raises(SettingsError, match="lr: unknown key outside any section"):
        load_settings(write(tmp_path, "lr = 1.0\n"), {})
    with pytest.raises(SettingsError, match="command line: train.nope: unknown key"):
        load_settings(None, {"train.nope": 1})


def test_settings_refuses_bad_override_naming_its_origin():
    with pytest.raises(SettingsError) as e:
        load_settings(None, {"train.lr": "fast"})
    assert str(e.value) == "command line: train.lr: must be a number > 0 and <= 1, got 'fast'"


def test_settings_refuses_inconsistent_combinations(tmp_path):
    with pytest.raises(SettingsError, match=r"train\.min_lr: must be <= train\.lr"):
        load_settings(write(tmp_path, "[train]\nlr = 1e-4\nmin_lr = 1e-3\n"), {})
    with pytest.raises(SettingsError, match=r"model\.n_embd: must be a multiple of model\.n_head"):
        load_settings(None, {"model.n_embd": 100, "model.n_head": 3})
    with pytest.raises(SettingsError, match="server.tcp: TCP is only served with CURVE"):
        load_settings(write(tmp_path, '[server]\ntcp = "tcp://127.0.0.1:5555"\n'), {})


def test_settings_tcp_with_curve_paths_relative_to_the_file(tmp_path):
    path = write(tmp_path, '[server]\ntcp = "tcp://[::1]:5555"\n'
                           'curve_secret_key_file = "keys/server.key_secret"\n'
                           'curve_authorized_keys_dir = "/etc/cllmd/clients"\n')
    s = load_settings(path, {})
    assert s.server.tcp == "tcp://[::1]:5555"
    assert s.server.curve_secret_key_file == str(tmp_path / "keys" / "server.key_secret")
    assert s.server.curve_authorized_keys_dir == "/etc/cllmd/clients"


def test_settings_unreadable_or_invalid_toml_names_the_file(tmp_path):
    with pytest.raises(SettingsError, match=f"{tmp_path / 'absent.toml'}: cannot read"):
        load_settings(tmp_path / "absent.toml", {})
    path = write(tmp_path, "[train\nlr = 1\n")
    with pytest.raises(SettingsError, match=f"{path}: not valid TOML: .*line 1"):
        load_settings(path, {})


def test_settings_render_default_toml_comments_every_key_at_its_default(tmp_path):
    text = render_default_toml()
    # As shipped, every key is commented out: the file parses to empty sections.
    assert tomllib.loads(text) == {s: {} for s in st.SECTIONS}
    assert load_settings(write(tmp_path, text), {}) == Settings()
    # Uncommenting every key gives back exactly the defaults, so the shown values are true.
    uncommented = re.sub(r"^#(?=[a-z_]+ = )", "", text, flags=re.M)
    doc = tomllib.loads(uncommented)
    assert {f"{s}.{k}" for s, t in doc.items() for k in t} == set(SCHEMA)
    assert load_settings(write(tmp_path, uncommented, "full.toml"), {}) == Settings()
    unwrapped = text.replace("\n# ", " ")
    for spec in SCHEMA.values():
        assert spec.doc[1:] in unwrapped


def test_settings_command_line_flags_from_schema():
    parser = argparse.ArgumentParser()
    st.add_arguments(parser)
    ns = parser.parse_args(["--train-lr", "3e-4", "--no-train-auto-train",
                            "--queue-max-file-bytes", "2MiB", "--queue-json-fields", "text,title"])
    overrides = st.overrides_from_args(ns)
    assert overrides == {"train.lr": "3e-4", "train.auto_train": False,
                         "queue.max_file_bytes": "2MiB", "queue.json_fields": "text,title"}
    s = load_settings(None, overrides)
    assert s.train.lr == 3e-4 and s.train.auto_train is False
    assert s.queue.max_file_bytes == 2 * 2**20 and s.queue.json_fields == ("text", "title")
    assert st.overrides_from_args(parser.parse_args([])) == {}
    help_text = parser.format_help()
    assert "--train-checkpoint-interval-seconds" in help_text
    assert "peak learning rate (AdamW) (default: 0.001)" in help_text


def test_settings_replace_validates_and_keeps_the_rest():
    s = load_settings(None, {"train.batch_size": 6})
    t = s.replace({"train.lr": 5e-4, "train.threads": 2}, origin="train.config.set")
    assert (t.train.lr, t.train.threads, t.train.batch_size) == (5e-4, 2, 6)
    assert s.train.lr == 1e-3  # the original is untouched
    with pytest.raises(SettingsError, match="train.config.set: train.threads: must be an integer"):
        s.replace({"train.threads": 99}, origin="train.config.set")
    with pytest.raises(SettingsError, match="train.min_lr: must be <= train.lr"):
        s.replace({"train.lr": 1e-5})
    assert st.validate("train.grad_clip", 2) == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.train.lr = 1.0


def test_settings_to_dict_round_trips():
    s = load_settings(None, {"queue.json_fields": ["a", "b"], "server.generate_workers": 3})
    d = s.to_dict()
    assert d["queue"]["json_fields"] == ["a", "b"] and d["server"]["generate_workers"] == 3
    flat = {f"{sec}.{k}": v for sec, table in d.items() for k, v in table.items()}
    assert load_settings(None, flat) == s


def test_settings_shipped_default_file_is_current():
    # systemd/cllmd.toml is generated from the schema (python -m cllmd.settings); a key added
    # to the schema must reach the shipped file too.
    shipped = Path(__file__).resolve().parent.parent / "systemd" / "cllmd.toml"
    if not shipped.exists():
        pytest.skip("systemd/cllmd.toml not written yet")
    assert shipped.read_text() == render_default_toml()
