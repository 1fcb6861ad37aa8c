"""Named models through the real daemon: migration of an old state directory, create, list,
show and rm over the socket and through `cllm`."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from cllm.catalogue import FINETUNE, SETTINGS
from cllm.client import RequestError
from cllmd.datastore import DataStore
from cllmd.model import Model, ModelConfig
from cllmd.models import Models, ModelsError
from cllmd.paths import Dirs
from cllmd.tokenizer import BytesTokenizer
from tests.daemonproc import daemon, wait_for  # noqa: F401  (the fixture)


def _cllm(d, *args):
    return subprocess.run([sys.executable, "-m", "cllm.cli", "--socket", str(d.run / "cllmd.sock"), *args],
                          capture_output=True, text=True, timeout=120)


def _tiny(path, seed=1, block=32):
    Model(ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=32, block_size=block), seed=seed,
          tokenizer=BytesTokenizer()).save(path)


def test_models_old_state_dir_migrates_to_default_with_nothing_lost(daemon, tmp_path):
    # a state directory as cllmd wrote it before named models: model, store, checkpoint, queue
    d = daemon("--no-train-auto-train", start=False)
    store = DataStore(d.state / "data", vocab_size=257)
    store.append(np.frombuffer(b"to be or not to be " * 50, np.uint8).astype(np.uint32), source="old.txt",
                 sha256="ab" * 32)
    store.close()
    model = Model.load(d.state / "model.cllm")
    before = model.flat.copy()
    (d.state / "checkpoints").mkdir()
    (d.state / "queue" / "done").mkdir(parents=True)
    (d.state / "queue" / "done" / "old.txt").write_text("to be or not to be")
    d.start()
    st = d.client.request("status")
    assert st["model"]["name"] == "default" and st["store"]["documents"] == 1
    assert d.client.request("models.list")["models"][0]["name"] == "default"
    d.stop()
    new = d.model_dir("default")
    assert not (d.state / "model.cllm").exists() and not (d.state / "data").exists()
    np.testing.assert_array_equal(Model.load(new / "model.cllm").flat, before)
    with DataStore(new / "data", vocab_size=257) as s:
        assert [doc.source for doc in s.documents()] == ["old.txt"]
    assert d.queue("done") == ["old.txt"]  # the queue stays at <state>/queue/
    assert (d.state / "active-model").read_text().strip() == "default"
    d.start()  # a second start finds nothing to migrate
    assert d.client.request("status")["store"]["documents"] == 1


def test_models_migration_finishes_after_a_crash_half_way(tmp_path):
    dirs = Dirs(state=tmp_path, runtime=tmp_path / "run", cache=tmp_path / "cache", config_file=None)
    _tiny(tmp_path / "model.cllm")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x").write_text("x")
    (tmp_path / "models" / "default").mkdir(parents=True)
    (tmp_path / "model.cllm").rename(tmp_path / "models" / "default" / "model.cllm")  # moved before a crash
    assert Models(dirs).migrate()
    assert (tmp_path / "models" / "default" / "data" / "x").read_text() == "x"
    assert Models(dirs).names() == ["default"]
    _tiny(tmp_path / "model.cllm")  # and one that cannot be merged is refused, naming both
    with pytest.raises(ModelsError, match="both exist"):
        Models(dirs).migrate()


def test_models_create_list_show_rm(daemon, tmp_path):
    d = daemon("--no-train-auto-train")
    c = d.client
    _tiny(tmp_path / "other.cllm", seed=2, block=16)
    info = c.request("model.create", name="small", **{"from": str(tmp_path / "other.cllm")})
    assert (info["name"], info["context"], info["active"], info["step"]) == ("small", 16, False, 0)
    listing = c.request("models.list")
    assert listing["active"] == "default"
    assert [(m["name"], m["active"]) for m in listing["models"]] == [("default", True), ("small", False)]
    shown = c.request("model.show", name="small")
    assert shown["tokenizer"] == {"kind": "bytes", "vocab_size": 257} and shown["parameters"] > 0
    for args, code, needle in [
        ({"name": "small", "from": "default"}, "bad_request", "already exists"),
        ({"name": "../x", "from": "default"}, "bad_request", "bad model name"),
        ({"name": "x", "from": str(tmp_path / "missing")}, "bad_request", "no such file or directory"),
    ]:
        with pytest.raises(RequestError) as e:
            c.request("model.create", **args)
        assert e.value.code == code and needle in str(e.value)
    (tmp_path / "broken.cllm").write_bytes((tmp_path / "other.cllm").read_bytes()[:500])
    with pytest.raises(RequestError, match="broken.cllm: truncated"):
        c.request("model.create", name="broken", **{"from": str(tmp_path / "broken.cllm")})
    with pytest.raises(RequestError) as e:
        c.request("model.show", name="nothing")
    assert e.value.code == "not_found"
    # generate can name a model that is not the active one: its own weights, its own context
    out = c.request("generate", prompt="ab", model="small", max_tokens=40, temperature=0, stream=False)
    ref = Model.load(tmp_path / "other.cllm")
    from cllmd.generate import Generation, SamplingOptions
    expected = Generation(ref, "ab", SamplingOptions(max_tokens=40, temperature=0)).text()
    assert out["text"] == expected and out["tokens_generated"] > 0
    with pytest.raises(RequestError) as e:
        c.request("generate", prompt="ab", model="nothing", stream=False)
    assert e.value.code == "not_found"
    with pytest.raises(RequestError, match="is the active model"):
        c.request("model.rm", name="default")
    assert c.request("model.rm", name="small") == {"name": "small", "removed": True}
    assert [m["name"] for m in c.request("models.list")["models"]] == ["default"]
    assert not d.model_dir("small").exists()
    assert not [p for p in (d.state / "models").iterdir() if p.name.startswith(".")]
    assert c.request("ping") is not None  # still serving


def test_models_cli_commands_with_json(daemon, tmp_path):
    d = daemon("--no-train-auto-train")
    _tiny(tmp_path / "m.cllm", seed=3)
    r = _cllm(d, "model", "create", "second", "--from", str(tmp_path / "m.cllm"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "second"
    r = _cllm(d, "model", "create", "third", "--from", str(tmp_path / "m.cllm"))
    assert r.returncode == 0 and "training with its own lr=0.0003, min_lr=3e-05" in r.stdout, r.stderr
    r = _cllm(d, "models")
    assert r.returncode == 0 and "* default" in r.stdout and "  second" in r.stdout
    listed = json.loads(_cllm(d, "models", "--json").stdout)
    assert {m["name"] for m in listed["models"]} == {"default", "second", "third"}
    r = _cllm(d, "model", "show", "second")
    assert r.returncode == 0 and "name        second" in r.stdout and "bytes (257 symbols)" in r.stdout
    r = _cllm(d, "generate", "--model", "second", "--max-tokens", "5", "--json", "hi")
    assert r.returncode == 0 and json.loads(r.stdout)["tokens_generated"] >= 0, r.stderr
    r = _cllm(d, "model", "rm", "default")
    assert r.returncode == 1 and "is the active model" in r.stderr and r.stderr.count("\n") == 1
    r = _cllm(d, "model", "rm", "second", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["removed"] is True


def test_models_create_from_a_hugging_face_directory(daemon, tmp_path):
    torch = pytest.importorskip("torch", reason="the Hugging Face fixture is written by transformers (test-only)")
    transformers = pytest.importorskip("transformers", reason="the fixture is written by transformers (test-only)")
    from tests.test_hf import _randomize, _train_tokenizer
    tok = transformers.GPT2TokenizerFast(tokenizer_object=_train_tokenizer(), eos_token="<|endoftext|>")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=len(tok))
    torch.manual_seed(0)
    _randomize(transformers.GPT2LMHeadModel(cfg)).save_pretrained(tmp_path / "hf", safe_serialization=True)
    tok.save_pretrained(tmp_path / "hf")
    d = daemon("--no-train-auto-train")
    info = d.client.request("model.create", name="gpt2-tiny", **{"from": str(tmp_path / "hf")})
    assert info["tokenizer"]["kind"] == "bpe" and info["vocab_size"] == len(tok) and info["source"]
    assert info["settings"] == FINETUNE  # an imported model is fine-tuned, not trained from scratch


def _greedy_hf(directory):
    """A GPT-2 directory written by transformers whose generation_config.json says: greedy, 9
    new tokens, a repetition penalty (over the whole context, as HF applies it)."""
    torch = pytest.importorskip("torch", reason="the Hugging Face fixture is written by transformers (test-only)")
    transformers = pytest.importorskip("transformers", reason="the fixture is written by transformers (test-only)")
    from tests.test_hf import _randomize, _train_tokenizer
    tok = transformers.GPT2TokenizerFast(tokenizer_object=_train_tokenizer(), eos_token="<|endoftext|>")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tok))
    torch.manual_seed(0)
    hf = _randomize(transformers.GPT2LMHeadModel(cfg))
    hf.generation_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=9,
                                                         repetition_penalty=1.3, eos_token_id=tok.eos_token_id)
    hf.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    assert (directory / "generation_config.json").is_file()
    return directory


def test_models_generation_config_defaults_apply_where_the_request_gives_none(daemon, tmp_path):
    from cllmd.generate import Generation, SamplingOptions
    _greedy_hf(tmp_path / "hf")
    d = daemon("--no-train-auto-train")
    c = d.client
    c.request("model.create", name="greedy", **{"from": str(tmp_path / "hf")})
    assert c.request("model.show", name="greedy")["generation_defaults"] == {
        "temperature": 0.0, "max_tokens": 9, "repeat_penalty": 1.3, "repeat_last_n": 64}
    model = Model.load(d.model_dir("greedy") / "model.cllm")
    prompt = "the model's own defaults"

    def expect(**opts):
        return Generation(model, prompt, SamplingOptions(**opts)).text()

    greedy = expect(temperature=0.0, max_tokens=9, repeat_penalty=1.3, repeat_last_n=64)
    out = c.request("generate", prompt=prompt, model="greedy", stream=False)  # nothing given
    assert (out["text"], out["tokens_generated"]) == (greedy, 9)
    # what the request gives wins, option by option; the rest still comes from the model
    out = c.request("generate", prompt=prompt, model="greedy", max_tokens=4, stream=False)
    assert (out["text"], out["tokens_generated"]) == (expect(temperature=0.0, max_tokens=4, repeat_penalty=1.3,
                                                             repeat_last_n=64), 4)
    out = c.request("generate", prompt=prompt, model="greedy", temperature=1.0, seed=5, stream=False)
    assert out["text"] == expect(temperature=1.0, seed=5, max_tokens=9, repeat_penalty=1.3, repeat_last_n=64)
    out = c.request("generate", prompt=prompt, model="greedy", max_tokens=None, stream=False)  # nil = not given
    assert out["tokens_generated"] == 9
    # the client sends only the flags given; streamed, and once the model is the active one
    r = _cllm(d, "generate", "--model", "greedy", "--json", prompt)
    assert r.returncode == 0 and json.loads(r.stdout)["text"] == greedy, r.stderr
    c.request("model.use", name="greedy", timeout=330)
    assert "".join(d.client.generate(prompt)) == greedy
    r = _cllm(d, "generate", "--help")
    assert "(default the model's, else 0.8)" in " ".join(r.stdout.split())  # as argparse wraps it
    # a model without generation defaults: the catalogue's (128 tokens at most, temperature 0.8)
    ref = Model.load(d.model_dir("default") / "model.cllm")
    out = c.request("generate", prompt="ab", model="default", seed=3, stream=False)
    assert out["text"] == Generation(ref, "ab", SamplingOptions(seed=3)).text()


def test_models_generation_config_defaults_through_the_http_gateway(daemon, tmp_path):
    pytest.importorskip("aiohttp", reason="the http extra installs aiohttp (pip install -e '.[http]')")
    from cllmd.generate import Generation, SamplingOptions
    from tests.gatewayproc import Gateway
    _greedy_hf(tmp_path / "hf")
    d = daemon("--no-train-auto-train")
    d.client.request("model.create", name="greedy", **{"from": str(tmp_path / "hf")})
    d.client.request("model.use", name="greedy", timeout=330)
    expected = Generation(Model.load(d.model_dir("greedy") / "model.cllm"), "Hi there",
                          SamplingOptions(temperature=0.0, max_tokens=9, repeat_penalty=1.3, repeat_last_n=64)).text()
    g = Gateway(d.run / "cllmd.sock", tmp_path / "gw.log").start()
    try:
        # an OpenAI client that gives no max_tokens or temperature gets the model's own
        status, body = g.json("POST", "/v1/completions", {"model": "greedy", "prompt": "Hi there"})
        assert status == 200, body
        assert body["choices"][0]["text"] == expected and body["usage"]["completion_tokens"] == 9
        status, body = g.json("POST", "/v1/completions", {"model": "greedy", "prompt": "Hi there", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] == 3, body
    finally:
        g.stop()


def test_models_own_settings_fine_tuning_defaults_kept_with_the_model(daemon, tmp_path):
    config = tmp_path / "cllmd.toml"
    config.write_text("[train]\nweight_decay = 0.05\nlr = 5e-4\n")
    d = daemon("--no-train-auto-train", "--config", str(config))
    c = d.client
    _tiny(tmp_path / "pre.cllm", seed=4)
    info = c.request("model.create", name="tuned", **{"from": str(tmp_path / "pre.cllm")})
    assert info["settings"] == FINETUNE
    assert c.request("model.show", name="default")["settings"] == {}  # a fresh model: today's defaults
    assert c.request("train.config.get")["lr"] == 5e-4  # default follows the file
    c.request("model.use", name="tuned", timeout=330)
    got = c.request("train.config.get")
    for key, value in FINETUNE.items():  # the model's own stand over the file's
        assert got[key] == value, key
    assert got["weight_decay"] == 0.05 and got["auto_train"] is False  # the rest: file, command line
    # a change is kept with the active model
    c.request("train.config.set", lr=2e-4, warmup=7)
    assert c.request("model.show", name="tuned")["settings"] == {**FINETUNE, "lr": 2e-4, "warmup": 7}
    assert json.loads((d.model_dir("tuned") / "settings.json").read_text())["lr"] == 2e-4
    c.request("model.use", name="default", timeout=330)
    got = c.request("train.config.get")
    assert (got["lr"], got["warmup"], got["replay_fraction"]) == (5e-4, SETTINGS["train.warmup"].default,
                                                                 SETTINGS["train.replay_fraction"].default)
    c.request("model.use", name="tuned", timeout=330)
    assert (c.request("train.config.get")["lr"], c.request("train.config.get")["warmup"]) == (2e-4, 7)
    # a reload applies the file's values, but not over the model's own
    import signal
    config.write_text("[train]\nweight_decay = 0.07\nlr = 6e-4\n")
    d.proc.send_signal(signal.SIGHUP)
    got = wait_for(lambda: (g := c.request("train.config.get"))["weight_decay"] == 0.07 and g, 30, "the reload")
    assert (got["lr"], got["warmup"]) == (2e-4, 7)
    d.stop()
    d.start()  # across a restart
    assert d.client.request("train.config.get")["lr"] == 2e-4
    d.stop()
    # the same state directory, and the command line still beats the model's own
    d2 = daemon("--no-train-auto-train", "--config", str(config), "--train-lr", "3e-4")
    assert d2.client.request("train.config.get")["lr"] == 3e-4
    assert d2.client.request("model.show", name="tuned")["settings"]["lr"] == 2e-4
    # a bad settings file is refused naming the file and the key; the daemon serves on
    c2 = d2.client
    c2.request("model.use", name="default", timeout=330)
    (d2.model_dir("tuned") / "settings.json").write_text('{"lr": 7}')
    with pytest.raises(RequestError, match=r"tuned/settings.json: lr must be a number > 0 and <= 1"):
        c2.request("model.use", name="tuned", timeout=330)
    assert c2.request("status")["model"]["name"] == "default"
    assert "lr must be" in c2.request("model.show", name="tuned")["settings_error"]
    d2.stop()
    # at start-up, one line naming the file, and exit code 2 (as for a bad configuration file)
    (d2.state / "active-model").write_text("tuned\n")
    d3 = daemon("--no-train-auto-train", start=False).start(wait=False)
    assert d3.proc.wait(120) == 2
    last = d3.log_path.read_text().strip().splitlines()[-1]
    assert last.startswith("cllmd: ") and "tuned/settings.json: lr must be a number > 0 and <= 1" in last


def test_models_use_switches_live_during_generation_and_training(daemon, tmp_path):
    from tests.daemonproc import drop
    d = daemon("--no-train-auto-train")
    c = d.client
    _tiny(tmp_path / "b.cllm", seed=5, block=16)
    c.request("model.create", name="b", **{"from": str(tmp_path / "b.cllm")})
    names = [f"a{i}.txt" for i in range(4)]  # a document goes to validation 1 time in 20
    for i, name in enumerate(names):
        drop(d, name, f"the default model learns text number {i}. ".encode() * 40)
    wait_for(lambda: d.queue("done") == names, 60, "the a files ingested")
    c.request("train.start", steps=100_000)
    wait_for(lambda: c.request("train.status")["step"] >= 2, 60, "training of default")
    # a long streamed generation on default's weights, in flight across the switch
    gen_client = d.connect()
    gen = gen_client.generate("the ", max_tokens=4000, temperature=1.0, seed=1)
    first = next(iter(gen))
    events = c.subscribe(["model"])
    time.sleep(0.3)  # the subscription reaches the daemon's PUB socket
    info = c.request("model.use", name="b", timeout=330)
    assert (info["name"], info["active"], info["context"]) == ("b", True, 16)
    text = first + "".join(gen)
    assert gen.stats["stop_reason"] in ("max_tokens", "eot") and gen.stats["tokens_generated"] > 0 and text
    gen_client.close()
    topic, event = events.recv(timeout=10)
    assert (topic, event["active"], event["previous"]) == ("model", "b", "default")
    events.close()
    st = c.request("status")
    assert st["model"]["name"] == "b" and st["model"]["context"] == 16 and st["store"]["documents"] == 0
    listing = c.request("models.list")
    assert [(m["name"], m["active"]) for m in listing["models"]] == [("b", True), ("default", False)]
    old_step = [m for m in listing["models"] if m["name"] == "default"][0]["step"]
    assert old_step >= 2  # default's training was checkpointed at the switch
    # the queue now trains the active model: the file goes into b's data store
    drop(d, "b.txt", b"model b learns this one. " * 40)
    wait_for(lambda: c.request("status")["store"]["documents"] == 1, 60, "b.txt in b's store")
    c.request("train.start", steps=3)
    wait_for(lambda: c.request("train.status")["step"] >= 3, 60, "training of b")
    with pytest.raises(RequestError, match="is the active model"):
        c.request("model.rm", name="b")
    d.stop()
    d.start()  # the choice survives a restart
    assert d.client.request("status")["model"]["name"] == "b"
    with DataStore(d.model_dir("default") / "data", vocab_size=257) as s:
        assert len(s.documents()) == 4  # the a files stayed with default


def test_models_use_train_on_existing_retokenizes_the_ingested_texts(daemon, tmp_path):
    from tests.daemonproc import drop
    d = daemon("--no-train-auto-train")
    c = d.client
    names = [f"t{i}.txt" for i in range(3)]
    for i, name in enumerate(names):
        drop(d, name, f"text {i} that every model should be able to learn from. ".encode() * 20)
    wait_for(lambda: d.queue("done") == names, 60, "the files ingested")
    _tiny(tmp_path / "n.cllm", seed=7)
    c.request("model.create", name="n", **{"from": str(tmp_path / "n.cllm")})
    r = _cllm(d, "model", "use", "n", "--train-on-existing", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["retokenizing"] == 3
    wait_for(lambda: c.request("status")["store"]["documents"] == 3, 60, "the texts in n's store")
    d.stop()
    with DataStore(d.model_dir("n") / "data", vocab_size=257) as new, \
            DataStore(d.model_dir("default") / "data", vocab_size=257) as old:
        assert sorted(doc.sha256 for doc in new.documents()) == sorted(doc.sha256 for doc in old.documents())
