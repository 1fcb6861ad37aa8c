"""OpenAI-compatible requests and replies: a request body becomes cllmd `generate` arguments
(or an ApiError in OpenAI's shape), and the daemon's pieces and statistics become completion
objects and stream chunks. No I/O here; cllm.http.app does the HTTP."""
from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cllm.catalogue import MAX_STOPS, SAMPLING, check_sampling
from cllm.chat import ASSISTANT, TURN_STOP, USER


class ApiError(Exception):
    """An error reply: ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# cllmd's stop_reason -> OpenAI's finish_reason ("length": the max_tokens budget ran out).
FINISH_REASONS = {"max_tokens": "length", "eot": "stop", "stop": "stop", "cancelled": "stop"}

# OpenAI fields cllmd cannot honour, each with the values that mean "not used" (accepted).
UNSUPPORTED = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None, False),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
}
# Sampling options passed through as they are: OpenAI's, and the llama.cpp-style extensions.
PASSED = ("temperature", "top_p", "seed", "top_k", "min_p", "repeat_penalty", "repeat_last_n")


@dataclass
class Job:
    """One validated request: the daemon's `generate` arguments and how to answer."""
    kind: str                      # "completion" or "chat"
    model: str
    prompt: str
    args: dict                     # generate's arguments, without the prompt
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: "")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        self.id = self.id or prefix + secrets.token_hex(12)


def parse_body(raw: bytes) -> Any:
    """A request body as JSON, or the invalid_json error."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _body_map(body: Any) -> dict:
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _common(body: dict, models: list[dict]) -> tuple[str, dict, bool, bool]:
    """``models``: the daemon's, as cllm.http.bridge.Bridge.models gives them."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required: the name of one of the models GET /v1/models lists",
                      "model", "missing_model" if model is None else "invalid_type")
    names = [m["name"] for m in models]
    if model not in names:
        raise ApiError(404, f"The model '{model}' does not exist; this daemon has: {', '.join(names)}",
                       param="model", code="model_not_found")
    active = next((m["name"] for m in models if m.get("active")), None)
    if model != active:
        # the daemon generates with its active model only; switching also moves its training
        raise ApiError(409, f"The model '{model}' is not the active one ('{active}'): make it "
                            f"active first (the dashboard's switcher, or `cllm model use {model}`)",
                       param="model", code="model_not_active")
    for name, fine in UNSUPPORTED.items():
        if name in body and body[name] not in fine:
            allowed = " or ".join("null" if v is None else repr(v) for v in fine)
            raise invalid(f"'{name}' is not supported by cllmd (only {allowed}), got {body[name]!r}",
                          name, "unsupported_parameter")
    args: dict = {}
    for name in PASSED:
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value):
            raise invalid(f"'{name}' must be a number, got {value!r}", name, "invalid_type")
        args[name] = value
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"'{name}' must be an integer, got {value!r}", name, "invalid_type")
        args["max_tokens"] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid(f"'stop' must be a string or an array of strings, got {stop!r}", "stop",
                          "invalid_type")
        args["stop"] = [s for s in stops if s]
    # The catalogue's bounds (the daemon's own): one refusal naming the field.
    for problem in check_sampling(args):
        name = problem.split(" ", 1)[0].rstrip(":")
        param = "max_tokens" if name == "max_tokens" and "max_completion_tokens" in body else name
        raise invalid(f"'{param}' {problem.split(' ', 1)[1]}", param)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid(f"'stream' must be a boolean, got {stream!r}", "stream", "invalid_type")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise invalid("'stream_options' is only allowed with 'stream': true", "stream_options")
        include_usage = bool(opts.get("include_usage"))
    return model, args, stream, include_usage


def completion_job(body: Any, models: list[dict]) -> Job:
    """POST /v1/completions: the prompt continues as it is."""
    body = _body_map(body)
    model, args, stream, include_usage = _common(body, models)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("'prompt' must be a string (or an array of exactly one string; token arrays "
                      "are not supported)", "prompt", "invalid_type")
    return Job("completion", model, prompt, args, stream, include_usage)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{i}].content must be a string or an array of text parts",
                  f"messages[{i}].content", "invalid_type")


def chat_prompt(messages: list[dict]) -> str:
    """The chat template for a plain language model, the transcript `cllm chat` sends::

        SYSTEM\\n\\n
        User: ...\\nAssistant: ...\\n
        User: LAST\\nAssistant:

    System messages (and developer messages) form the leading block, in order; the answer is
    generated after "Assistant:" and stops where the model starts a "\\nUser:" line."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer") and m["content"])
    out = [f"{system}\n\n"] if system else []
    for m in messages:
        if m["role"] == "user":
            out.append(f"{USER}: {m['content']}\n")
        elif m["role"] == "assistant":
            out.append(f"{ASSISTANT}: {m['content']}\n")
    if messages and messages[-1]["role"] == "assistant":
        out[-1] = out[-1].rstrip("\n")   # continue the assistant's unfinished answer
    else:
        out.append(f"{ASSISTANT}:")
    return "".join(out)


ROLES = ("system", "developer", "user", "assistant")


def chat_job(body: Any, models: list[dict]) -> Job:
    """POST /v1/chat/completions: the messages through chat_prompt."""
    body = _body_map(body)
    model, args, stream, include_usage = _common(body, models)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of {role, content}", "messages",
                      "invalid_type")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                          f"messages[{i}].role")
        clean.append({"role": role, "content": _content(m, i)})
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise invalid("'response_format' other than {\"type\": \"text\"} is not supported",
                      "response_format", "unsupported_parameter")
    stops = args.get("stop", [])
    args["stop"] = ([TURN_STOP] + [s for s in stops if s != TURN_STOP])[:MAX_STOPS]
    return Job("chat", model, chat_prompt(clean), args, stream, include_usage)


# --------------------------------------------------------------------------- replies


def usage(stats: dict) -> dict:
    p, c = int(stats.get("tokens_prompt") or 0), int(stats.get("tokens_generated") or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def finish_reason(stats: dict) -> str:
    return FINISH_REASONS.get(stats.get("stop_reason"), "stop")


def response(job: Job, text: str, stats: dict) -> dict:
    """The whole (non-streamed) answer."""
    head = {"id": job.id, "created": job.created, "model": job.model}
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason(stats)}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(stats)}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(stats)}
    return {**head, "object": "text_completion", "choices": [choice], "usage": usage(stats)}


def chunk(job: Job, piece: str | None = None, *, first: bool = False, stats: dict | None = None,
          usage_only: bool = False) -> dict:
    """One stream chunk: a piece of text (``first`` also carries the chat role), the closing
    chunk with finish_reason (``stats``), or the usage chunk (``usage_only``)."""
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    out: dict = {"id": job.id, "object": obj, "created": job.created, "model": job.model}
    if usage_only:
        out["choices"] = []
        out["usage"] = usage(stats or {})
        return out
    reason = finish_reason(stats) if stats is not None else None
    if job.kind == "chat":
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if piece is not None:
            delta["content"] = piece
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
    else:
        out["choices"] = [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}]
    if job.include_usage:
        out["usage"] = None
    return out


def model_object(model: dict) -> dict:
    return {"id": model["name"], "object": "model", "created": 0, "owned_by": "cllmd"}
