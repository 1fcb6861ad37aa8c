"""cllm-http against a real daemon: the OpenAI-compatible API through the official `openai`
client and at the byte level, errors, auth, cancellation on disconnect, health and metrics."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the test extra installs openai (pip install -e '.[test]')")
pytest.importorskip("aiohttp", reason="the http extra installs aiohttp (pip install -e '.[http]')")

from tests.daemonproc import Daemon, wait_for  # noqa: E402
from tests.gatewayproc import Gateway  # noqa: E402

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("http-daemon")).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def gateway(daemon, tmp_path_factory):
    g = Gateway(daemon.run / "cllmd.sock", tmp_path_factory.mktemp("gw") / "gw.log").start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def model(gateway) -> str:
    status, body = gateway.json("GET", "/v1/models")
    assert status == 200, body
    return body["data"][0]["id"]


@pytest.fixture(scope="module")
def api(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


def running_generations(daemon) -> int:
    return daemon.client.request("status")["serving"]["running"]


# --------------------------------------------------------------------------- the openai client


def test_http_openai_lists_the_daemons_model(api, daemon):
    models = api.models.list()
    listing = daemon.client.request("models.list")
    assert [m.id for m in models.data] == [listing["active"]]
    assert models.data[0].object == "model" and models.data[0].owned_by == "cllmd"


def test_http_openai_completion(api, model):
    r = api.completions.create(model=model, prompt="Hello", max_tokens=7, temperature=0, seed=1)
    assert r.object == "text_completion" and r.model == model
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens == len("Hello".encode())
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    again = api.completions.create(model=model, prompt="Hello", max_tokens=7, temperature=0, seed=1)
    assert again.choices[0].text == r.choices[0].text   # greedy: the same text


def test_http_openai_completion_streamed_with_usage(api, model):
    full = api.completions.create(model=model, prompt="abc", max_tokens=9, temperature=0)
    chunks = list(api.completions.create(model=model, prompt="abc", max_tokens=9, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_http_openai_chat_completion(api, model):
    r = api.chat.completions.create(model=model, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 6
    # the documented template, byte for byte (bytes tokenizer: one token per byte)
    prompt = "Be brief.\n\nUser: Hi\nAssistant:"
    assert r.usage.prompt_tokens == len(prompt.encode())


def test_http_openai_chat_streamed(api, model):
    chunks = list(api.chat.completions.create(
        model=model, max_tokens=8, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Hello there"}],
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])
    whole = api.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                        messages=[{"role": "user", "content": "Hello there"}])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == whole.choices[0].message.content


def test_http_openai_stop_string_gives_finish_reason_stop(api, model):
    # greedy text, then the same request stopping at a piece of it
    text = api.completions.create(model=model, prompt="xyz", max_tokens=12, temperature=0).choices[0].text
    stop = next((text[i:i + 1] for i in range(2, len(text)) if text[i:i + 1].isprintable()
                 and text[i:i + 1].strip()), None)
    if stop is None:
        pytest.skip(f"no printable character to stop at in {text!r}")
    r = api.completions.create(model=model, prompt="xyz", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]


# --------------------------------------------------------------------------- the bytes


def raw_post(gateway, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=30)
    s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
              b"Content-Type: application/json\r\nContent-Length: " + str(len(data)).encode()
              + b"\r\nConnection: close\r\n\r\n" + data)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        assert rest[n:n + 2] == b"\r\n", "chunk not followed by CRLF"
        body = rest[n + 2:]
    return out


def test_http_sse_framing_at_the_byte_level(gateway, model):
    s = raw_post(gateway, "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 5,
                                              "temperature": 0, "stream": True})
    head, _, body = read_all(s).partition(b"\r\n\r\n")
    s.close()
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    headers = {k.lower(): v for k, _, v in (ln.partition(b": ") for ln in lines[1:])}
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache"
    stream = dechunk(body) if headers.get(b"transfer-encoding") == b"chunked" else body
    events = stream.split(b"\n\n")
    assert events[-1] == b"", "the stream must end with a blank line"
    assert events[-2] == b"data: [DONE]"
    for ev in events[:-2]:
        assert ev.startswith(b"data: {") and b"\n" not in ev, ev   # one data line per event
        json.loads(ev[len(b"data: "):])
    payloads = [json.loads(ev[6:]) for ev in events[:-2]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert stream.count(b"data: ") == len(events) - 1


def cancellations(gateway) -> int:
    # the gateway logs the daemon's own done event of each generation it cancelled
    return gateway.output().count("with stop_reason cancelled")


def test_http_disconnect_mid_stream_cancels_the_generation(gateway, daemon, model):
    assert running_generations(daemon) == 0
    before = cancellations(gateway)
    # greedy: this tiny random model then never samples end-of-text, and 65536 tokens take minutes
    s = raw_post(gateway, "/v1/completions", {"model": model, "prompt": "Go", "max_tokens": 65536,
                                              "temperature": 0, "stream": True})
    got = b""
    while got.count(b"data: ") < 3:
        got += s.recv(4096)
    assert running_generations(daemon) == 1
    s.close()
    wait_for(lambda: running_generations(daemon) == 0, 30, "the daemon to end the generation")
    wait_for(lambda: cancellations(gateway) == before + 1, 10, "the daemon's cancelled done event")
    assert 'cllmd_generation_requests_total{status="cancelled"} 1.0' in scrape(gateway)


def test_http_non_streamed_disconnect_cancels_too(gateway, daemon, model):
    before = cancellations(gateway)
    s = raw_post(gateway, "/v1/completions", {"model": model, "prompt": "Go", "max_tokens": 65536,
                                              "temperature": 0})
    wait_for(lambda: running_generations(daemon) == 1, 15, "the generation to start")
    s.close()
    wait_for(lambda: running_generations(daemon) == 0, 30, "the daemon to end the generation")
    wait_for(lambda: cancellations(gateway) == before + 1, 10, "the daemon's cancelled done event")


# --------------------------------------------------------------------------- errors


def assert_openai_error(status: int, body: dict, want_status: int, param=None, code=None):
    assert status == want_status, body
    err = body["error"]
    assert set(err) >= {"message", "type", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


@pytest.mark.parametrize("raw", [b"{bad", b"", b"\xff\xfe", b"[1, 2", b"nan"])
def test_http_malformed_json_gets_an_openai_error(gateway, raw):
    status, _, data = gateway.call("POST", "/v1/chat/completions", raw=raw)
    assert_openai_error(status, json.loads(data), 400, code="invalid_json")


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": "no-such-model", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"prompt": "x"}, 400, "model", "missing_model"),
    ({"model": None, "prompt": "x", "max_tokens": 0}, 400, "model", None),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": 65537}, 400, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "invalid_value"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"prompt": "x", "n": 2}, 400, "n", "unsupported_parameter"),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs", "unsupported_parameter"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ({"prompt": [1, 2, 3]}, 400, "prompt", "invalid_type"),
    ({"prompt": "x", "stop": [1]}, 400, "stop", "invalid_type"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ([1, 2], 400, None, None),
])
def test_http_bad_completion_requests_get_openai_errors(gateway, model, body, status, param, code):
    if isinstance(body, dict) and "model" not in body and param != "model":
        body = {"model": model, **body}
    if isinstance(body, dict) and body.get("model") is None and "model" in body:
        body = {k: v for k, v in body.items() if k != "model"} | {"model": None}
    got, reply = gateway.json("POST", "/v1/completions", body)
    assert_openai_error(got, reply, status, param, code)
    assert gateway.json("GET", "/v1/models")[0] == 200   # and it keeps serving


@pytest.mark.parametrize("messages, param", [
    ([], "messages"), ("hi", "messages"), ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"), ([3], "messages[0]"),
])
def test_http_bad_chat_requests_get_openai_errors(gateway, model, messages, param):
    got, reply = gateway.json("POST", "/v1/chat/completions", {"model": model, "messages": messages})
    assert_openai_error(got, reply, 400, param)


def test_http_openai_client_raises_on_errors(api, model):
    with pytest.raises(openai.NotFoundError) as e:
        api.completions.create(model="nope", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=10**6)
    assert e.value.param == "max_tokens"
    assert api.models.list().data   # still serving


def test_http_unknown_path_and_method(gateway):
    assert gateway.call("GET", "/v1/nothing")[0] == 404
    assert gateway.call("GET", "/v1/completions")[0] == 405


# --------------------------------------------------------------------------- auth


@pytest.fixture(scope="module")
def locked(daemon, tmp_path_factory):
    g = Gateway(daemon.run / "cllmd.sock", tmp_path_factory.mktemp("gw-token") / "gw.log",
                token=TOKEN).start()
    yield g
    g.stop()


@pytest.mark.parametrize("path, method", [("/v1/models", "GET"), ("/v1/completions", "POST"),
                                          ("/v1/chat/completions", "POST"), ("/health", "GET")])
def test_http_token_required(locked, path, method):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
        status, hdrs, data = locked.call(method, path, {}, headers=headers)
        assert status == 401, (headers, data)
        assert hdrs.get("WWW-Authenticate", "").startswith("Bearer")
        assert json.loads(data)["error"]["code"] == "invalid_api_key"


def test_http_token_accepted_by_the_openai_client(locked):
    with openai.OpenAI(base_url=locked.url + "/v1", api_key=TOKEN, max_retries=0) as api:
        assert api.models.list().data
    with openai.OpenAI(base_url=locked.url + "/v1", api_key="wrong", max_retries=0) as api:
        with pytest.raises(openai.AuthenticationError):
            api.models.list()


def test_http_token_file(daemon, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    g = Gateway(daemon.run / "cllmd.sock", tmp_path / "gw.log", "--token-file", str(token_file)).start()
    try:
        assert g.call("GET", "/v1/models")[0] == 401
        assert g.call("GET", "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    finally:
        g.stop()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_http_refuses_to_bind_beyond_loopback_without_a_token(host):
    r = subprocess.run([sys.executable, "-m", "cllm.http.app", "--host", host, "--port", "1"],
                       capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert r.returncode == 2, r
    assert "refusing to bind" in r.stderr and "token" in r.stderr


def test_http_empty_token_file_is_refused(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    r = subprocess.run([sys.executable, "-m", "cllm.http.app", "--token-file", str(empty)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "is empty" in r.stderr


# --------------------------------------------------------------------------- health


def test_http_health_follows_the_daemon(gateway, daemon):
    status, body = gateway.json("GET", "/health")
    assert status == 200 and body["status"] in ("ready", "training", "paused"), body


def test_http_health_503_when_the_daemon_is_unreachable(tmp_path):
    g = Gateway(tmp_path / "nothing.sock", tmp_path / "gw.log").start()
    try:
        status, body = g.json("GET", "/health")
        assert status == 503 and body["status"] == "unreachable"
        status, body = g.json("GET", "/v1/models")
        assert_openai_error(status, body, 503, code="daemon_unavailable")
    finally:
        g.stop()


# --------------------------------------------------------------------------- training, metrics


def corpus(variant: int, n_bytes: int = 60_000) -> bytes:
    words = ["the", "spheres", "turn", "around", "node", "zero", "and", "learn", "from", "files",
             "dropped", "into", "a", "queue", "while", "loss", "falls", "slowly"]
    out, i = [], 0
    while sum(map(len, out)) < n_bytes:
        out.append(words[(i * 7 + i // 3 + variant) % len(words)] + (".\n" if i % 11 == 10 else " "))
        i += 1
    return "".join(out).encode()


def split_files() -> dict[str, bytes]:
    """One file the data store puts into the training split and one into validation (the
    split is a function of a document's hash)."""
    import hashlib
    from cllmd.datastore import split_of
    chosen: dict[str, bytes] = {}
    for variant in range(200):
        data = corpus(variant)
        chosen.setdefault(split_of(hashlib.sha256(data).hexdigest()), data)
        if len(chosen) == 2:
            return {"words-train.txt": chosen["train"], "words-val.txt": chosen["val"]}
    raise AssertionError("no corpus variant for each split")


def start_training(daemon) -> None:
    """Ingest a training and a validation file, then train until told to stop."""
    from tests.daemonproc import drop
    files = split_files()
    for name, data in files.items():
        drop(daemon, name, data)
    wait_for(lambda: daemon.queue("done") == sorted(files), 120, "the files to be ingested")
    daemon.client.request("train.config.set", eval_interval=5)
    daemon.client.request("train.start", steps=10**9)


@pytest.fixture(scope="module")
def trained(daemon):
    """The daemon after it ingested its files and trained some steps, still training."""
    start_training(daemon)
    wait_for(lambda: daemon.client.request("train.status")["step"] >= 5, 600,
             "5 training steps (the first compiles the kernels)")
    return daemon


def scrape(gateway) -> str:
    status, headers, data = gateway.call("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return data.decode()


NAME_RX = r"^cllmd_[a-z0-9_]+$"


def families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_http_metrics_parse_without_naming_violations(gateway, trained):
    import re
    wait_for(lambda: "cllmd_train_step_duration_seconds_count" in scrape(gateway)
             and families(scrape(gateway))["cllmd_train_step_duration_seconds"].samples[-1].value > 0,
             60, "step durations from the train events")
    text = scrape(gateway)
    fams = families(text)
    for name, fam in fams.items():
        assert re.match(NAME_RX, name), f"{name}: not a cllmd_ name in snake case"
        assert fam.documentation, f"{name} has no HELP"
        for sample in fam.samples:
            assert re.match(NAME_RX, sample.name), sample
            assert ":" not in sample.name
            if fam.type == "counter":
                assert sample.name.endswith("_total"), f"counter sample {sample.name}"
        if fam.type == "counter":
            assert f"# TYPE {name}_total counter" in text or f"# TYPE {name} counter" in text
    docs = (Path(__file__).resolve().parent.parent / "docs" / "http.md").read_text()
    for name, fam in fams.items():
        shown = name + ("_total" if fam.type == "counter" else "")
        assert f"| `{shown}` | {fam.type} |" in docs, f"docs/http.md does not list {shown}"
    want = {
        "counter": ["cllmd_train_steps", "cllmd_train_tokens", "cllmd_sphere_busy_seconds",
                    "cllmd_queue_files_ingested", "cllmd_generation_requests", "cllmd_generation_tokens"],
        "gauge": ["cllmd_train_loss", "cllmd_train_val_loss", "cllmd_train_learning_rate",
                  "cllmd_train_grad_norm", "cllmd_queue_files", "cllmd_model_parameters",
                  "cllmd_build_info", "cllmd_up"],
        "histogram": ["cllmd_train_step_duration_seconds", "cllmd_generation_time_to_first_token_seconds"],
    }
    for kind, names in want.items():
        for name in names:
            assert name in fams and fams[name].type == kind, (name, fams.get(name))
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    status = trained.client.request("stats")
    assert values[("cllmd_up", ())] == 1
    assert values[("cllmd_train_steps_total", ())] >= 5
    assert values[("cllmd_model_parameters", (("model", status["model"]["name"]),))] == status["model"]["parameters"]
    assert values[("cllmd_queue_files", (("state", "done"),))] == 2
    assert values[("cllmd_queue_files_ingested_total", (("result", "done"),))] == 2
    spheres = [s for s in fams["cllmd_sphere_busy_seconds"].samples]
    assert sorted(int(s.labels["sphere"]) for s in spheres) == list(range(1, 13))
    assert sum(s.value for s in spheres) > 0
    assert values[("cllmd_train_loss", ())] > 0


def test_http_metrics_pass_promtool(gateway, trained, tmp_path):
    import shutil
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found (Debian package prometheus; .ci/run installs it)")
    path = tmp_path / "metrics.txt"
    path.write_text(scrape(gateway))
    with path.open("rb") as f:
        r = subprocess.run([promtool, "check", "metrics"], stdin=f, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_http_metrics_count_generations(gateway, model):
    before = families(scrape(gateway))
    status, body = gateway.json("POST", "/v1/completions", {"model": model, "prompt": "a", "max_tokens": 3})
    assert status == 200
    after = families(scrape(gateway))

    def value(fams, sample, **labels):
        family = sample.removesuffix("_total").removesuffix("_count")
        return next((s.value for s in fams[family].samples if s.name == sample and s.labels == labels), 0)
    assert value(after, "cllmd_generation_requests_total", status="length") == \
        value(before, "cllmd_generation_requests_total", status="length") + 1
    assert value(after, "cllmd_generation_tokens_total") == value(before, "cllmd_generation_tokens_total") + 3
    assert value(after, "cllmd_generation_time_to_first_token_seconds_count") == \
        value(before, "cllmd_generation_time_to_first_token_seconds_count") + 1


def test_http_metrics_when_the_daemon_is_unreachable(tmp_path):
    g = Gateway(tmp_path / "nothing.sock", tmp_path / "gw.log").start()
    try:
        fams = families(scrape(g))
        assert fams["cllmd_up"].samples[0].value == 0
        assert "cllmd_build_info" in fams
    finally:
        g.stop()


def test_http_health_training_and_paused(gateway, trained):
    trained.client.request("train.start")
    wait_for(lambda: gateway.json("GET", "/health")[1]["status"] == "training", 30, "health: training")
    trained.client.request("train.pause")
    wait_for(lambda: gateway.json("GET", "/health")[1]["status"] == "paused", 30, "health: paused")
    trained.client.request("train.resume")
    wait_for(lambda: gateway.json("GET", "/health")[1]["status"] == "training", 30, "health: training again")


# --------------------------------------------------------------------------- named models


def test_http_models_lists_named_models_and_switches(gateway, daemon, model, api, tmp_path):
    from cllmd.model import Model, ModelConfig
    from cllmd.tokenizer import BytesTokenizer
    source = tmp_path / "other.cllm"
    Model(ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=16, block_size=32), seed=1,
          tokenizer=BytesTokenizer()).save(source)
    daemon.client.request("model.create", name="other", **{"from": str(source)}, timeout=120)
    try:
        assert [m.id for m in api.models.list().data] == [model, "other"]   # the active one first
        status, body = gateway.json("POST", "/v1/completions", {"model": "other", "prompt": "x"})
        assert_openai_error(status, body, 409, "model", "model_not_active")
        status, body = gateway.json("POST", "/api/models/use", {"name": "other"}, timeout=180)
        assert status == 200 and body["name"] == "other", body
        assert [m.id for m in api.models.list().data] == ["other", model]
        r = api.completions.create(model="other", prompt="x", max_tokens=3)
        assert r.model == "other" and r.usage.completion_tokens == 3
        status, body = gateway.json("POST", "/api/models/use", {"name": "nope"})
        assert_openai_error(status, body, 404, code="not_found")
    finally:
        daemon.client.request("model.use", name=model, timeout=180)
        daemon.client.request("model.rm", name="other", timeout=60)


def test_http_health_loading_while_the_daemon_starts(tmp_path):
    # a fresh kernel cache: the daemon compiles its kernels at start-up, answering `unavailable`
    d = Daemon(tmp_path / "d").start(wait=False)
    g = Gateway(d.run / "cllmd.sock", tmp_path / "gw.log").start()
    try:
        seen = set()

        def state(want):
            status, body = g.json("GET", "/health")
            seen.add(body["status"])
            assert (status == 200) == (body["status"] in ("ready", "training", "paused")), body
            return body if body["status"] == want else None
        loading = wait_for(lambda: state("loading"), 120, "health: loading")
        assert "starting" in loading and loading["error"]
        wait_for(lambda: state("ready") or state("training"), 600, "health: ready")
        assert seen <= {"unreachable", "loading", "ready", "training"}, seen
    finally:
        g.stop()
        d.stop()
