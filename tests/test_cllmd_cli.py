"""The offline `cllmd` commands as a user runs them: real subprocesses, real files."""
import json
import subprocess
import sys

import pytest


def cllmd(*args, stdin=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "cllmd.cli", *map(str, args)], input=stdin, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data.txt"
    data.write_text("".join(f"Line {i}: all the world's a stage, and all the men and women merely players.\n"
                            for i in range(300)))
    out = tmp / "m.cllm"
    r = cllmd("train", "--data", data, "--tokenizer", "bpe", "--vocab-size", "300", "--n-layer", "1",
              "--n-embd", "32", "--block-size", "32", "--steps", "30", "--eval-interval", "10",
              "--spheres", "15", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    return tmp, out, json.loads(r.stdout), r.stderr


def test_cllmd_train_json_summary_and_sphere_table(trained):
    _, out, summary, stderr = trained
    assert out.exists()
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 12 * 32
    assert summary["val_loss"] < 6.0 and summary["tokens_per_second"] > 0
    assert [h["step"] for h in summary["history"]] == [10, 20, 30]
    assert "sphere  state" in stderr and stderr.count("\n     12  ") >= 2


def test_cllmd_generate_streams_and_reports(trained):
    _, out, _, _ = trained
    r = cllmd("generate", out, "Line 5:", "--max-tokens", "20", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["tokens_generated"] <= 20 and result["stop_reason"] in ("max_tokens", "eot")
    r2 = cllmd("generate", out, "--max-tokens", "5", "--seed", "1", stdin="Line")
    assert r2.returncode == 0 and "tok/s" in r2.stderr


def test_cllmd_generate_int8_reports_speeds(trained):
    _, out, _, _ = trained
    r = cllmd("generate", out, "Line 5:", "--max-tokens", "12", "--temperature", "0", "--weights", "int8", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert 0 < result["time_to_first_token"] <= result["seconds"]
    assert result["prompt_tokens_per_second"] > 0 and result["tokens_prompt"] > 1
    if result["tokens_generated"] > 1:
        assert result["tokens_per_second"] > 0
    bad = cllmd("generate", out, "x", "--weights", "int4")
    assert bad.returncode != 0 and "int4" in bad.stderr


def test_cllmd_tokenize_and_inspect(trained):
    _, out, _, _ = trained
    r = cllmd("tokenize", "--model", out, "all the world", "--json")
    assert r.returncode == 0
    ids = json.loads(r.stdout)
    assert ids["count"] == len(ids["ids"]) > 0
    r = cllmd("tokenize", "héllo", "--json")
    assert json.loads(r.stdout)["ids"] == list("héllo".encode())
    r = cllmd("inspect", out, "--json")
    info = json.loads(r.stdout)
    assert info["config"]["n_embd"] == 32 and info["tokenizer"]["kind"] == "bpe" and info["parameters"] > 0
    assert info["metadata"]["train_summary"]["steps"] == 30


def test_cllmd_tokenizer_train(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("abc abd abe " * 200)
    r = cllmd("tokenizer", "train", data, "--vocab-size", "270", "--out", tmp_path / "tok.json", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vocab_size"] <= 270 and (tmp_path / "tok.json").exists()


@pytest.mark.parametrize("args, message", [
    (["train", "--steps", "-3"], "expected an integer >= 0"),
    (["train", "--data", "/no/such/file"], "cannot read /no/such/file"),
    (["train", "--n-embd", "30", "--n-head", "4", "--data", "{data}"], "divisible"),
    (["generate", "/no/such.cllm", "hi"], "/no/such.cllm: cannot read"),
    (["generate", "{garbage}", "hi"], "not a .cllm file"),
    (["inspect", "{garbage}"], "not a .cllm file"),
    (["tokenize", "--tokenizer-file", "/no/tok.json", "x"], "tok.json"),
])
def test_cllmd_bad_input_gives_one_line_and_exit_2(tmp_path, args, message):
    garbage = tmp_path / "garbage.cllm"
    garbage.write_bytes(b"this is not a model")
    data = tmp_path / "d.txt"
    data.write_text("some text " * 100)
    args = [a.format(garbage=garbage, data=data) for a in args]
    r = cllmd(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_cllmd_cli_python_dash_m_cllmd_is_the_cllmd_command():
    r = subprocess.run([sys.executable, "-m", "cllmd", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: cllmd ")
