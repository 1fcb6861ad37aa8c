"""`cllm chat` against a real daemon: driven through a real pseudo-terminal (readline, Ctrl-C as
a real SIGINT from the tty driver, Ctrl-D), and line by line with --json for scripts."""
from __future__ import annotations

import json
import subprocess

import pytest

from cllm.chat import ChatSession, Turn
from cllm.client import Client
from tests.daemonproc import Daemon, daemon, drop, wait_for  # noqa: F401 (fixture)
from tests.ptyterm import Pty, cllm

CONTEXT = 128


@pytest.fixture(scope="module")
def chatd(tmp_path_factory):
    """One daemon for the module, with a context of 128 bytes so a conversation has room."""
    from cllmd.model import Model, ModelConfig
    from cllmd.tokenizer import BytesTokenizer
    root = tmp_path_factory.mktemp("chatd")
    (root / "state").mkdir()
    cfg = ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=32, block_size=CONTEXT)
    Model(cfg, seed=0, tokenizer=BytesTokenizer()).save(root / "state" / "model.cllm")
    d = Daemon(root, "--no-train-auto-train").start()
    try:
        yield d
    finally:
        d.client.close()
        d.stop()


def sock(d) -> str:
    return str(d.run / "cllmd.sock")


def chat_pty(d, tmp_path, *args) -> Pty:
    return Pty(cllm("--socket", sock(d), "chat", *args), env={"XDG_STATE_HOME": str(tmp_path)})


def test_chat_session_keeps_the_newest_turns_within_the_context(chatd):
    with Client(sock(chatd)) as c:
        s = ChatSession(c, CONTEXT, system="Be brief.", options={"max_tokens": 32})
        assert s.room() == CONTEXT - 32
        for i in range(10):
            s.turns.append(Turn(f"question number {i}", f"answer number {i}"))
        prompt, used, dropped = s.build("last one")
        assert 0 < dropped < 10 and used <= s.room()
        # bytes tokenizer: a token per byte, so the count is exact
        assert used == len(prompt.encode())
        assert prompt.startswith("Be brief.\n\n") and prompt.endswith("User: last one\nAssistant:")
        kept = prompt.count("User: question number")
        assert kept == 10 - dropped and "question number 9" in prompt and "question number 0" not in prompt
        s.reset()
        assert s.build("x")[2] == 0 and "question" not in s.build("x")[0]


def test_chat_two_turns_system_and_ctrl_c_through_a_pty(chatd, tmp_path):
    t = chat_pty(chatd, tmp_path, "--temperature", "0", "--max-tokens", "6")
    try:
        t.expect(r"context 128 tokens.*\n[\s\S]*>>> ")
        m = t.mark()
        t.write("hello\r")
        used1 = int(t.expect(r"\[6 tokens, [\d.]+ tokens/s · context (\d+)/128\][\s\S]*>>> ", m).group(1))
        m = t.mark()
        t.write("how are you\r")
        used2 = int(t.expect(r"\[6 tokens, .* context (\d+)/128\][\s\S]*>>> ", m).group(1))
        assert used2 > used1 + len("User: hello\nAssistant: ")   # the first turn is in the prompt

        m = t.mark()
        t.write("/system Be brief.\r")
        t.expect(r"system prompt set \(11 tokens\)[\s\S]*>>> ", m)
        m = t.mark()
        t.write("/show\r")
        shown = t.expect(r"/show\n([\s\S]*)>>> ", m).group(1)
        assert shown.startswith("Be brief.\n\nUser: hello\nAssistant: ")
        assert "User: how are you\nAssistant: " in shown
        m = t.mark()
        t.write("and now\r")
        used3 = int(t.expect(r"\[6 tokens, .* context (\d+)/128\][\s\S]*>>> ", m).group(1))
        assert used3 > used2 + len("Be brief.\n\n")

        m = t.mark()
        saved = tmp_path / "talk.json"
        t.write(f"/save {saved}\r")
        t.expect(r"saved to .*talk\.json[\s\S]*>>> ", m)
        data = json.loads(saved.read_text())
        assert data["system"] == "Be brief." and [x["user"] for x in data["turns"]] == \
            ["hello", "how are you", "and now"]

        # a long answer, stopped by Ctrl-C: typed into the terminal, so the tty sends SIGINT
        m = t.mark()
        t.write("/set max_tokens 65536\r")
        t.expect(r"max_tokens = 65536[\s\S]*>>> ", m)
        m = t.mark()
        t.write("go on\r")
        t.expect(r"go on\n(?:\(.*\)\n)*[^(\n][^\n]{19}", m)   # notes in brackets, then the answer
        t.write("\x03")
        t.expect(r"\[stopped · [\d.k]+ tokens, .* context \d+/128\][\s\S]*>>> ", m)
        with Client(sock(chatd)) as c:
            wait_for(lambda: c.request("status")["serving"]["running"] == 0, 30, "the daemon to stop generating")
        assert t.proc.poll() is None   # still chatting

        t.wait_reading()
        t.write("\x03")   # the second Ctrl-C, right after the stopped answer, leaves
        assert t.wait(30) == 0
    finally:
        t.close()
    assert (tmp_path / "cllm" / "chat_history").read_text().count("hello") == 1   # readline history


def test_chat_ctrl_d_leaves(chatd, tmp_path):
    t = chat_pty(chatd, tmp_path)
    try:
        t.expect(r">>> ")
        t.wait_reading()
        t.write("\x04")
        assert t.wait(30) == 0
    finally:
        t.close()


def test_chat_ctrl_c_twice_at_the_prompt_leaves(chatd, tmp_path):
    t = chat_pty(chatd, tmp_path)
    try:
        t.expect(r">>> ")
        t.wait_reading()
        m = t.mark()
        t.write("\x03")
        t.expect(r"Ctrl-C again or Ctrl-D to leave[\s\S]*>>> ", m)
        assert t.proc.poll() is None
        t.wait_reading()
        t.write("\x03")
        assert t.wait(30) == 0
    finally:
        t.close()


def test_chat_json_lines_for_scripts_and_load(chatd, tmp_path):
    script = "hi there\n/system Be brief.\n/set temperature 0.5\n/set temperature 99\n/show\nhello again\n" \
             f"/save {tmp_path / 'c.json'}\n/bogus\n"
    run = subprocess.run(cllm("--socket", sock(chatd), "--json", "chat", "--temperature", "0", "--max-tokens", "4"),
                         input=script, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = [json.loads(line) for line in run.stdout.splitlines()]
    assert [o.get("user") or o.get("command") for o in out] == \
        ["hi there", "/system", "/set", "/set", "/show", "hello again", "/save", "/bogus"]
    first, second = out[0], out[5]
    assert first["tokens_generated"] == 4 and first["context"] == CONTEXT and first["stopped"] is False
    assert first["tokens_prompt"] == len("User: hi there\nAssistant:")
    assert second["tokens_prompt"] > first["tokens_prompt"] + len("Be brief.\n\n")
    assert out[2]["message"] == "temperature = 0.5"
    assert out[3]["ok"] is False and "temperature must be" in out[3]["error"]
    assert out[4]["message"].startswith("Be brief.\n\nUser: hi there\n")
    assert out[7]["ok"] is False and "unknown command /bogus" in out[7]["error"]

    # --load continues the saved conversation, with its settings (max_tokens 4 leaves room for it all)
    run = subprocess.run(cllm("--socket", sock(chatd), "--json", "chat", "--load", str(tmp_path / "c.json")),
                         input="/show\n", capture_output=True, text=True, timeout=60)
    shown = json.loads(run.stdout.splitlines()[0])["message"]
    assert shown.startswith("Be brief.\n\nUser: hi there\n") and "User: hello again\n" in shown


def test_chat_bad_option_is_a_usage_error(chatd):
    run = subprocess.run(cllm("--socket", sock(chatd), "chat", "--top-p", "0"), capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "top_p must be a number > 0" in run.stderr


def test_chat_with_the_defaults_remembers_the_turn_before(chatd):
    with Client(sock(chatd)) as c:
        s = ChatSession(c, CONTEXT)   # max_tokens 128 = the whole context of 128
        s.turns.append(Turn("name?", "x" * 300))   # an answer as long as max_tokens allows
        prompt, used, dropped = s.build("and then?")
        assert dropped == 0 and used <= s.room() and used == len(prompt.encode())
        assert prompt.startswith("User: name?\nAssistant: xxx") and " ...\nUser: and then?" in prompt
        s.turns += [Turn("a", "b"), Turn("c", "d")]   # short turns fit whole; the long one is cut
        prompt, used, dropped = s.build("e")
        assert dropped == 0 and "User: a\nAssistant: b\nUser: c\nAssistant: d\n" in prompt and " ...\n" in prompt


def test_chat_keeps_the_conversation_across_a_daemon_restart(chatd, tmp_path):
    t = chat_pty(chatd, tmp_path, "--temperature", "0", "--max-tokens", "6")
    try:
        t.expect(r"context 128 tokens.*\n[\s\S]*>>> ")
        m = t.mark()
        t.write("hello\r")
        t.expect(r"\[6 tokens, .* context \d+/128\][\s\S]*>>> ", m)
        chatd.stop()
        m = t.mark()
        t.write("are you there\r")   # while the daemon is down
        t.expect(r"cllmd is not running .*: waiting for cllmd; the conversation is kept", m)
        chatd.start()
        t.expect(r"cllmd is back: send that message again\)[\s\S]*>>> ", m)
        m = t.mark()
        t.write("again\r")
        t.expect(r"\[6 tokens, .* context \d+/128\][\s\S]*>>> ", m)
        saved = tmp_path / "talk.json"
        m = t.mark()
        t.write(f"/save {saved}\r")
        t.expect(r"saved to .*talk\.json[\s\S]*>>> ", m)
        assert [x["user"] for x in json.loads(saved.read_text())["turns"]] == ["hello", "again"]
        t.write("\x04")
        assert t.wait(30) == 0
    finally:
        t.close()
