"""The `cllm` command: one table of subcommands speaking the daemon's protocol. Each command
returns an exit code and errors become exit codes in one place (see EXIT_* and docs/cli.md)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cllm import __version__
from cllm.catalogue import (
    Kind, add_sampling_arguments, renamed_error, runtime_settings, sampling_from_args, unescape,
)
from cllm.chat import ctrl_c_cancels
from cllm.client import Client, ClientError, DaemonNotRunning, RequestError
from cllm.fmt import duration, human_bytes, human_count, number, plural
from cllm.layout import formats_help, sanitize_name, write_incoming

EXIT_OK = 0            # done
EXIT_DAEMON = 1        # the daemon answered with an error (or did not answer in time)
EXIT_USAGE = 2         # bad arguments, or no daemon to talk to
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
EXIT_BROKEN_PIPE = 141  # stdout closed early, e.g. `cllm generate ... | head` (128 + SIGPIPE)

PASSTHROUGH = ("crawl", "top")   # parse their own arguments


class UsageError(Exception):
    """Bad arguments: one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one clear line instead of argparse's usage dump
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_globals(p: argparse.ArgumentParser, suppress: bool) -> None:
    """--socket/--timeout/--json, valid before and after the subcommand (the subcommand's copy
    has no default, so it never overwrites a value given before it)."""
    d = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    p.add_argument("--socket", metavar="PATH", default=d(None),
                   help="the daemon's socket: a path or an ipc:// / tcp:// endpoint "
                        "(default: $CLLM_SOCKET, else the daemon's runtime directory)")
    p.add_argument("--timeout", type=_positive_float, metavar="SECONDS", default=d(10.0),
                   help="seconds to wait for each reply (default 10)")
    p.add_argument("--json", action="store_true", default=d(False),
                   help="machine-readable JSON on stdout")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def _add_sampling(p: argparse.ArgumentParser) -> None:
    add_sampling_arguments(p)  # only what is given is sent: the model's defaults, the catalogue's


def _sampling(a: argparse.Namespace) -> dict:
    try:
        return sampling_from_args(a)
    except ValueError as e:
        raise UsageError(f"{a.prog_name}: {e}") from None


# --------------------------------------------------------------------------- the command context

class Ctx:
    """What a command works with: its arguments, a lazily opened Client, and output helpers."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.json = bool(getattr(args, "json", False))
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.args.socket, timeout=self.args.timeout)
        return self._client

    def request(self, op: str, **args: Any) -> Any:
        return self.client.request(op, **args)

    def print_json(self, obj: Any) -> None:
        print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _stdin_text(prog: str, given: str | None, what: str) -> str:
    if given is not None and given != "-":
        return given
    if given is None and sys.stdin.isatty():
        raise UsageError(f"{prog}: no {what}: give it as an argument or pipe it on stdin")
    return sys.stdin.read()


# --------------------------------------------------------------------------- status and ping

def cmd_status(ctx: Ctx, a) -> int:
    st = ctx.request("status")
    if ctx.json:
        ctx.print_json(st)
        return EXIT_OK
    d, m, t, q, s = st["daemon"], st["model"], st["train"], st["queue"], st["serving"]
    print(f"daemon    cllmd {d.get('version')} (pid {d.get('pid')}), up {duration(d.get('uptime_s'))}, "
          f"cpu {number(d.get('cpu_percent'), '.0f')}%, rss {human_bytes(d.get('rss_bytes'))}")
    print(f"model     {m.get('name')}: {human_count(m.get('parameters'))} parameters, "
          f"context {m.get('context')}, vocabulary {m.get('vocab_size')}")
    print(_train_line(t))
    print(f"          loss {number(t.get('loss'))}, val loss {number(t.get('val_loss'))}, "
          f"perplexity {number(t.get('perplexity'), '.2f')}, lr {number(t.get('lr'), '.2e')}, "
          f"{human_count(t.get('tokens_per_second'))} tokens/s")
    current = f" (now: {q['current']})" if q.get("current") else ""
    print(f"queue     {q.get('incoming', 0)} incoming, {q.get('processing', 0)} processing, "
          f"{q.get('done', 0)} done, {q.get('failed', 0)} failed{current}")
    print(f"serving   {s.get('running', 0)} running, {s.get('waiting', 0)} waiting, "
          f"{human_count(s.get('tokens_per_second'))} tokens/s")
    return EXIT_OK


def _train_line(t: dict) -> str:
    budget = t.get("budget")
    extra = ""
    if budget:
        extra = f", {human_count(budget)} steps to go (eta {duration(t.get('eta_s'))})"
    auto = t.get("auto_train")
    auto_s = "" if auto is None else f", auto-train {'on' if auto else 'off'}"
    return (f"training  {t.get('state')}, step {t.get('step')}, {human_count(t.get('tokens_seen'))} tokens "
            f"seen{extra}{auto_s}")


def cmd_ping(ctx: Ctx, a) -> int:
    rtts, info = [], {}
    for i in range(a.count):
        if i:
            time.sleep(a.interval)
        t0 = time.perf_counter()
        info = ctx.request("ping")
        rtt = time.perf_counter() - t0
        rtts.append(rtt)
        if not ctx.json:
            starting = f" (starting: {info['starting']})" if info.get("starting") else ""
            print(f"pong from {info.get('daemon')} (protocol {info.get('version')}): "
                  f"time={rtt * 1000:.2f} ms{starting}")
    if ctx.json:
        ctx.print_json({"daemon": info.get("daemon"), "version": info.get("version"),
                        **({"starting": info["starting"]} if info.get("starting") else {}),
                        "rtt_ms": [round(r * 1000, 3) for r in rtts],
                        "min_ms": round(min(rtts) * 1000, 3), "avg_ms": round(sum(rtts) / len(rtts) * 1000, 3),
                        "max_ms": round(max(rtts) * 1000, 3)})
    elif len(rtts) > 1:
        print(f"{len(rtts)} pings: min/avg/max = {min(rtts) * 1000:.2f}/"
              f"{sum(rtts) / len(rtts) * 1000:.2f}/{max(rtts) * 1000:.2f} ms")
    return EXIT_OK


# --------------------------------------------------------------------------- generation and chat

def cmd_generate(ctx: Ctx, a) -> int:
    prompt = _stdin_text("cllm generate", a.prompt, "prompt")
    opts = _sampling(a)
    if a.model:
        opts["model"] = a.model
    gen = ctx.client.generate(prompt, **opts)
    out = sys.stdout
    try:
        with ctrl_c_cancels(gen) as ctrl_c:   # Ctrl-C cancels in the daemon; the stream then ends
            for piece in gen:
                if not ctx.json:
                    out.write(piece)
                    out.flush()
    finally:
        gen.close()
    interrupted = ctrl_c["interrupted"]
    stats = gen.stats or {}
    if ctx.json:
        ctx.print_json({"text": gen.text, **stats})
    else:
        if gen.text and not gen.text.endswith("\n") and out.isatty():
            out.write("\n")
        out.flush()
        if not a.quiet:
            print(f"[{stats.get('tokens_prompt', '?')} prompt tokens, "
                  f"{stats.get('tokens_generated', 0)} generated in {number(stats.get('seconds'), '.2f')} s, "
                  f"{number(stats.get('tokens_per_second'), '.1f')} tokens/s, "
                  f"stop: {stats.get('stop_reason')}]", file=sys.stderr)
    if stats.get("stop_reason") == "error":
        print(f"cllm generate: the generation failed: {stats.get('error')}", file=sys.stderr)
        return EXIT_DAEMON
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def cmd_chat(ctx: Ctx, a) -> int:
    from cllm import chat
    opts = _sampling(a)
    stops = opts.pop("stop", [])
    try:
        return chat.run(ctx.client, system=unescape(a.system or ""), options=opts, stops=stops,
                        load=a.load, as_json=ctx.json)
    except chat.LoadError as e:
        raise UsageError(f"cllm chat: {e}") from None


# --------------------------------------------------------------------------- training

# The settable keys of train.config.set: the catalogue's runtime settings, each read by its kind.
TRAIN_KEYS: dict[str, Kind] = {s.name: s.kind for s in runtime_settings()}


def parse_setting(item: str) -> tuple[str, Any]:
    """'lr=3e-4' -> ('lr', 0.0003); UsageError naming what is wrong."""
    key, eq, text = item.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key:
        raise UsageError(f"cllm train config: expected KEY=VALUE, got {item!r}")
    if key not in TRAIN_KEYS:
        renamed = renamed_error(key)
        if renamed:
            raise UsageError(f"cllm train config: {key} {renamed}")
        raise UsageError(f"cllm train config: unknown key {key!r} (one of: {', '.join(TRAIN_KEYS)})")
    try:
        return key, TRAIN_KEYS[key].value(text.strip())
    except ValueError as e:
        raise UsageError(f"cllm train config: {key} {e}") from None


def _perplexity(t: dict) -> float | None:
    """exp(val loss) when known, else exp(loss), as the status op reports it."""
    if t.get("perplexity") is not None:
        return t["perplexity"]
    loss = t.get("val_loss") if t.get("val_loss") is not None else t.get("loss")
    return math.exp(min(loss, 700.0)) if isinstance(loss, (int, float)) else None


def _print_train(t: dict) -> None:
    print(_train_line(t))
    print(f"loss      {number(t.get('loss'))}, val loss {number(t.get('val_loss'))}, "
          f"perplexity {number(_perplexity(t), '.2f')}")
    print(f"lr        {number(t.get('lr'), '.2e')}, grad norm {number(t.get('grad_norm'), '.3f')}, "
          f"{human_count(t.get('tokens_per_second'))} tokens/s")
    print(f"threads   {t.get('threads')}, batch {t.get('batch_size', '-')}, "
          f"{plural(t.get('skipped_steps') or 0, 'skipped step')}, {t.get('precision', '-')} products")
    spheres = t.get("spheres") or []
    if spheres:
        by_state: dict[str, int] = {}
        for sp in spheres:
            by_state[sp.get("state")] = by_state.get(sp.get("state"), 0) + 1
        print(f"spheres   {len(spheres)}: " + ", ".join(f"{n} {st}" for st, n in sorted(by_state.items())))
    if t.get("last_error"):
        print(f"error     {t['last_error']}")


def _train_op(op: str) -> Callable[[Ctx, Any], int]:
    def run(ctx: Ctx, a) -> int:
        args = {"steps": a.steps} if op == "train.start" and a.steps is not None else {}
        result = ctx.request(op, **args)
        if ctx.json:
            ctx.print_json(result)
        else:
            _print_train(result)
        return EXIT_OK
    return run


def cmd_train_config(ctx: Ctx, a) -> int:
    changes = dict(parse_setting(item) for item in a.settings)
    if not changes:
        cfg = ctx.request("train.config.get")
        if ctx.json:
            ctx.print_json(cfg)
        else:
            width = max(map(len, cfg), default=0)
            for k, v in cfg.items():
                print(f"{k:{width}} = {json.dumps(v)}")
        return EXIT_OK
    result = ctx.request("train.config.set", **changes)
    if ctx.json:
        ctx.print_json(result)
    else:
        for k in changes:
            print(f"{k} = {json.dumps(result['config'].get(k))}")
        print(f"(applies at step {result.get('applies_at_step')})")
    return EXIT_OK


# --------------------------------------------------------------------------- the queue

def _files_under(paths: list[str]) -> list[Path]:
    """The files named, a directory standing for the regular files under it (sorted; hidden
    names and symbolic links inside it are left out)."""
    out: list[Path] = []
    for f in paths:
        p = Path(f)
        if not p.is_dir():
            out.append(p)
            continue
        found = []
        for root, dirs, names in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                q = Path(root) / n
                if not n.startswith(".") and not q.is_symlink() and q.is_file():
                    found.append(q)
        if not found:
            raise UsageError(f"cllm queue add: no files under {f}")
        out.extend(found)
    return out


def cmd_queue_add(ctx: Ctx, a) -> int:
    files = []
    from_dir = any(Path(f).is_dir() for f in a.files)
    for p in _files_under(a.files):
        f = str(p)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise UsageError(f"cllm queue add: cannot read {f}: {e.strerror or e}") from None
        if not data:
            if from_dir:   # one empty file in a tree does not stop the others
                print(f"cllm queue add: skipping {f}: empty", file=sys.stderr)
                continue
            raise UsageError(f"cllm queue add: {f} is empty")
        files.append((p, data))
    incoming = None
    if not a.via_socket:
        root = Path(a.queue_dir) if a.queue_dir else Path(ctx.request("status")["queue"]["dir"])
        candidate = root / "incoming"
        if candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK):
            incoming = candidate
        elif a.queue_dir:
            raise UsageError(f"cllm queue add: {candidate} is not a writable directory")
    added = []
    for p, data in files:
        if incoming is not None:
            name = write_incoming(incoming, sanitize_name(p.name), data)
            entry = {"file": str(p), "name": name, "bytes": len(data), "via": "directory",
                     "path": str(incoming / name)}
        else:
            res = ctx.request("queue.add", name=sanitize_name(p.name), data=data)
            entry = {"file": str(p), "name": res["name"], "bytes": res.get("bytes", len(data)), "via": "socket"}
        added.append(entry)
        if not ctx.json:
            where = entry.get("path") or "the daemon (over the socket)"
            print(f"queued {p} as {entry['name']} ({human_bytes(entry['bytes'])}) -> {where}")
    if ctx.json:
        ctx.print_json({"added": added})
    return EXIT_OK


QUEUE_LS_LIMIT = 20        # a screenful; --limit N or --all for more
QUEUE_LS_ALL = 100_000     # the protocol's largest queue.list limit


def cmd_queue_ls(ctx: Ctx, a) -> int:
    limit = QUEUE_LS_ALL if a.all else a.limit
    args = {"limit": limit}
    if a.state:
        args["state"] = a.state
    res = ctx.request("queue.list", **args)
    if ctx.json:
        ctx.print_json(res)
        return EXIT_OK
    counts = res.get("counts", {})
    print("  ".join(f"{st} {counts.get(st, 0)}" for st in ("incoming", "processing", "done", "failed")))
    now = time.time()
    for state in ("incoming", "processing", "done", "failed"):
        if a.state and state != a.state:
            continue
        files = [f for f in res.get("files", []) if f.get("state") == state]
        if not files:
            continue
        print(f"\n{state} ({counts.get(state, len(files))})")
        width = min(40, max(len(f["name"]) for f in files))
        for f in files:
            age = duration(now - f["mtime"]) + " ago" if f.get("mtime") else "-"
            line = f"  {f['name']:{width}}  {human_bytes(f.get('bytes')):>9}  {age:>9}"
            r = f.get("reason")
            if r:
                line += f"  {r.get('reason')} ({plural(r.get('attempts') or 0, 'attempt')})"
            print(line)
    if res.get("truncated"):
        print(f"\n(only the newest {limit} files are listed: --limit N or --all for more)")
    return EXIT_OK


def cmd_queue_show(ctx: Ctx, a) -> int:
    res = ctx.request("queue.show", name=a.name, max_chars=a.max_chars)
    if ctx.json:
        ctx.print_json(res)
        return EXIT_OK
    if res.get("error"):
        print(f"cllm queue show: {a.name} ({res.get('state')}) would be refused: {res['error']}", file=sys.stderr)
        return EXIT_DAEMON
    print(f"# {res['name']} ({res['state']}): {res['format']}, {res['chars']:,} characters, "
          f"source {res['source']}", file=sys.stderr)
    sys.stdout.write(res["text"] + ("" if res["text"].endswith("\n") else "\n"))
    if res.get("truncated"):
        print(f"# ... the first {a.max_chars:,} of {res['chars']:,} characters (--max-chars N for more)",
              file=sys.stderr)
    return EXIT_OK


def cmd_queue_retry(ctx: Ctx, a) -> int:
    done = []
    for name in a.names:
        done.append(ctx.request("queue.retry", name=name))
        if not ctx.json:
            print(f"{name}: back in incoming/ as {done[-1].get('name')}")
    if ctx.json:
        ctx.print_json({"retried": done})
    return EXIT_OK


# --------------------------------------------------------------------------- the model and tokens

def cmd_model_info(ctx: Ctx, a) -> int:
    info = ctx.request("model.info")
    if ctx.json:
        ctx.print_json(info)
        return EXIT_OK
    cfg = dict(info.get("config") or {})
    tok = info.get("tokenizer") or {}
    print(f"name        {info.get('name')}")
    print(f"path        {info.get('path')}")
    print(f"parameters  {human_count(info.get('parameters'))} ({info.get('parameters')})")
    print(f"shape       {cfg.pop('n_layer', '?')} layers, {cfg.pop('n_head', '?')} heads, embedding "
          f"{cfg.pop('n_embd', '?')}, context {cfg.pop('context', '?')}, vocabulary {cfg.pop('vocab_size', '?')}")
    cfg.pop("block_size", None)
    print(f"tokenizer   {tok.get('kind')} ({tok.get('vocab_size')} symbols)")
    print(f"trained     step {info.get('step')}, {human_count(info.get('tokens_seen'))} tokens seen")
    if cfg:
        print("options     " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(cfg.items())))
    return EXIT_OK


def _model_line(m: dict) -> str:
    tok = m.get("tokenizer") or {}
    tokenizer = f"{tok.get('kind', '-')} ({tok.get('vocab_size', '-')})"
    return (f"{'*' if m.get('active') else ' '} {m.get('name'):<20} {human_count(m.get('parameters')):>10}  "
            f"{m.get('context'):>7}  {tokenizer:<14} {m.get('step'):>8}")


def cmd_models(ctx: Ctx, a) -> int:
    res = ctx.request("models.list")
    if ctx.json:
        ctx.print_json(res)
        return EXIT_OK
    print(f"  {'name':<20} {'parameters':>10}  {'context':>7}  {'tokenizer':<14} {'step':>8}")
    for m in res.get("models", []):
        print(_model_line(m))
    print("(* the active model)")
    return EXIT_OK


def cmd_model_show(ctx: Ctx, a) -> int:
    info = ctx.request("model.show", name=a.name)
    if ctx.json:
        ctx.print_json(info)
        return EXIT_OK
    cfg = info.get("config") or {}
    tok = info.get("tokenizer") or {}
    print(f"name        {info.get('name')}{' (active)' if info.get('active') else ''}")
    print(f"path        {info.get('path')}")
    print(f"parameters  {human_count(info.get('parameters'))} ({info.get('parameters')})")
    print(f"shape       {cfg.get('n_layer')} layers, {cfg.get('n_head')} heads, embedding {cfg.get('n_embd')}, "
          f"context {info.get('context')}, vocabulary {info.get('vocab_size')}")
    print(f"tokenizer   {tok.get('kind')} ({tok.get('vocab_size')} symbols)")
    print(f"trained     step {info.get('step')}, {human_count(info.get('tokens_seen'))} tokens seen")
    if info.get("source"):
        print(f"from        {info['source']}")
    if info.get("generation_defaults"):
        print("generation  " + ", ".join(f"{k}={v}" for k, v in sorted(info["generation_defaults"].items())))
    if info.get("settings"):  # its own train settings, over the configuration file's
        print("training    " + ", ".join(f"{k}={v}" for k, v in sorted(info["settings"].items())))
    return EXIT_OK


def cmd_model_create(ctx: Ctx, a) -> int:
    source = a.source
    if source != "default" and os.path.exists(source):
        source = os.path.abspath(source)  # the daemon resolves paths from its own directory
    info = ctx.request("model.create", name=a.name, timeout=max(ctx.args.timeout, 600.0), **{"from": source})
    if ctx.json:
        ctx.print_json(info)
    else:
        print(f"created model {info.get('name')} from {a.source}: {human_count(info.get('parameters'))} parameters, "
              f"context {info.get('context')}")
        if info.get("settings"):  # a model made from existing weights: the fine-tuning defaults
            print("training with its own " + ", ".join(f"{k}={v}" for k, v in sorted(info["settings"].items()))
                  + " (cllm train config changes them while it is active)")
    return EXIT_OK


def cmd_model_use(ctx: Ctx, a) -> int:
    # the old model finishes its step and checkpoints first
    info = ctx.request("model.use", name=a.name, train_on_existing=a.train_on_existing,
                       timeout=max(ctx.args.timeout, 330.0))
    if ctx.json:
        ctx.print_json(info)
    else:
        print(f"active model: {info.get('name')} (step {info.get('step')}); training and generation follow it")
        if a.train_on_existing:
            print(f"tokenizing the {info.get('retokenizing')} texts ingested before for it (in the background)")
    return EXIT_OK


def cmd_model_rm(ctx: Ctx, a) -> int:
    res = ctx.request("model.rm", name=a.name)
    if ctx.json:
        ctx.print_json(res)
    else:
        print(f"removed model {a.name}")
    return EXIT_OK


def _write_op(op: str, what: str) -> Callable[[Ctx, Any], int]:
    def run(ctx: Ctx, a) -> int:
        res = ctx.request(op, timeout=max(ctx.args.timeout, 130.0))   # the daemon waits up to 120 s
        if ctx.json:
            ctx.print_json(res)
        else:
            print(f"{what} at step {res.get('step')} written to {res.get('path')} "
                  f"({human_bytes(res.get('bytes'))}, {number(res.get('seconds'), '.2f')} s)")
        return EXIT_OK
    return run


def cmd_tokenize(ctx: Ctx, a) -> int:
    text = _stdin_text("cllm tokenize", a.text, "text")
    res = ctx.request("tokenize", text=text)
    if ctx.json:
        ctx.print_json(res)
    else:
        print(" ".join(map(str, res["ids"])))
        print(plural(res["count"], "token"), file=sys.stderr)
    return EXIT_OK


def cmd_detokenize(ctx: Ctx, a) -> int:
    res = ctx.request("detokenize", ids=a.ids)
    if ctx.json:
        ctx.print_json(res)
    else:
        sys.stdout.write(res["text"])
        if sys.stdout.isatty() and not res["text"].endswith("\n"):
            sys.stdout.write("\n")
    return EXIT_OK


# --------------------------------------------------------------------------- pass-through commands

def _has_option(argv: list[str], name: str) -> bool:
    return any(x == name or x.startswith(name + "=") for x in argv)


def run_crawl(ctx: Ctx, rest: list[str]) -> int:
    """`cllm crawl`: the crawler (cllm.crawl), writing into the daemon's own queue directory
    when this user may, else handing pages to the daemon's queue.add."""
    from cllm import crawl
    if _has_option(rest, "-h") or _has_option(rest, "--help"):
        return crawl.main(rest)
    if ctx.json and "--json" not in rest:
        rest = [*rest, "--json"]
    send = None
    if not _has_option(rest, "--queue-dir"):
        try:
            queue_dir = ctx.request("status")["queue"].get("dir")
        except ClientError:   # not running, not ours to reach, not answering
            queue_dir = None   # crawl on into the default queue; the daemon picks it up later
        if queue_dir:
            rest = ["--queue-dir", queue_dir, *rest]

            def send(name: str, data: bytes) -> str:
                return ctx.request("queue.add", name=name, data=data)["name"]
    return crawl.main(rest, send=send)


def run_top(ctx: Ctx, rest: list[str]) -> int:
    from cllm import status
    head = []
    if ctx.args.socket and not _has_option(rest, "--socket"):
        head += ["--socket", ctx.args.socket]
    if ctx.json and "--json" not in rest:
        head.append("--json")
    return status.main([*head, *rest], prog="cllm top")


def _split_passthrough(argv: list[str]) -> tuple[list[str], str, list[str]] | None:
    i = 0
    while i < len(argv):
        x = argv[i]
        if x in ("--socket", "--timeout"):
            i += 2
        elif x.startswith(("--socket=", "--timeout=")) or x == "--json":
            i += 1
        elif x in PASSTHROUGH:
            return argv[:i], x, argv[i + 1:]
        else:
            return None
    return None


# --------------------------------------------------------------------------- the table

def build_parser() -> Parser:
    common = Parser(add_help=False)
    _add_globals(common, suppress=True)
    p = Parser(prog="cllm", description="Talk to cllmd, the local self-training language-model daemon.",
               epilog="Exit codes: 0 ok, 1 error from the daemon, 2 bad arguments or cllmd not running, "
                      "130 interrupted. See docs/cli.md.")
    p.add_argument("--version", action="version", version=f"cllm {__version__}")
    _add_globals(p, suppress=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def add(parent, name: str, help: str, func=None, **kw) -> Parser:
        sp = parent.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                               parents=[common], **kw)
        if func is not None:
            sp.set_defaults(func=func, prog_name=sp.prog)
        return sp

    add(sub, "status", "model, training, queue and serving at a glance", cmd_status)

    g = add(sub, "generate", "continue a prompt, streaming the text as it comes", cmd_generate)
    g.add_argument("prompt", nargs="?", help="the text to continue (default, or '-': stdin)")
    _add_sampling(g)
    g.add_argument("-q", "--quiet", action="store_true", help="no statistics on stderr")
    g.add_argument("--model", metavar="NAME", help="a named model (default: the active one; see cllm models)")

    c = add(sub, "chat", "an interactive conversation (/help inside for commands)", cmd_chat)
    c.add_argument("--system", metavar="TEXT", help="the system prompt")
    c.add_argument("--load", type=Path, metavar="FILE", help="continue a conversation saved with /save FILE.json")
    _add_sampling(c)

    t = add(sub, "train", "control training: start, stop, pause, resume, status, config")
    tsub = t.add_subparsers(dest="train_command", metavar="ACTION", parser_class=Parser, required=True)
    ts = add(tsub, "start", "start training (until stopped, or for --steps)", _train_op("train.start"))
    ts.add_argument("--steps", type=_int_at_least(1), metavar="N", help="run N steps, then go idle")
    add(tsub, "stop", "finish the current step and go idle", _train_op("train.stop"))
    add(tsub, "pause", "hold training after the current step", _train_op("train.pause"))
    add(tsub, "resume", "continue a paused run", _train_op("train.resume"))
    add(tsub, "status", "the training snapshot", _train_op("train.status"))
    tc = add(tsub, "config", "show, or set with KEY=VALUE, the training configuration", cmd_train_config)
    tc.add_argument("settings", nargs="*", metavar="KEY=VALUE", help=f"keys: {', '.join(TRAIN_KEYS)}")

    q = add(sub, "queue", "the training queue: add, ls, show, retry")
    qsub = q.add_subparsers(dest="queue_command", metavar="ACTION", parser_class=Parser, required=True)
    qa = add(qsub, "add", "queue files (or every file under a directory) for training", cmd_queue_add,
             epilog="Formats:\n" + formats_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    qa.add_argument("files", nargs="+", metavar="FILE|DIR")
    qa.add_argument("--queue-dir", metavar="DIR", help="the queue root (default: the daemon's)")
    qa.add_argument("--via-socket", action="store_true",
                    help="send the contents over the socket even when incoming/ is writable")
    ql = add(qsub, "ls", "list queued files by state, with failure reasons", cmd_queue_ls)
    ql.add_argument("--state", choices=("incoming", "processing", "done", "failed"))
    ql.add_argument("--limit", type=_int_at_least(1), default=QUEUE_LS_LIMIT, metavar="N",
                    help=f"files listed at most, newest first (default {QUEUE_LS_LIMIT})")
    ql.add_argument("--all", action="store_true", help=f"list every file (up to {QUEUE_LS_ALL:,})")
    qs = add(qsub, "show", "what a queued file becomes: its preprocessed text", cmd_queue_show)
    qs.add_argument("name", metavar="NAME")
    qs.add_argument("--max-chars", type=_int_at_least(1), default=65536, metavar="N",
                    help="characters shown at most (default 65536)")
    qr = add(qsub, "retry", "move failed files back to incoming/", cmd_queue_retry)
    qr.add_argument("names", nargs="+", metavar="NAME")

    add(sub, "models", "the named models: name, size, context, tokenizer, step, which is active", cmd_models)
    m = add(sub, "model", "the models: info, save, create, use, show, rm")
    msub = m.add_subparsers(dest="model_command", metavar="ACTION", parser_class=Parser, required=True)
    add(msub, "info", "the active model's configuration, size, tokenizer and training progress", cmd_model_info)
    add(msub, "save", "write the current weights to the model file", _write_op("model.save", "model"))
    mc = add(msub, "create", "a new named model from a Hugging Face directory, a .cllm file or 'default'",
             cmd_model_create)
    mc.add_argument("name", help="the new model's name")
    mc.add_argument("--from", dest="source", required=True, metavar="SRC",
                    help="a Hugging Face GPT-2 directory, a .cllm file, or 'default' for a fresh default model")
    mu = add(msub, "use", "make a model the active one, live: training and generation follow it", cmd_model_use)
    mu.add_argument("name")
    mu.add_argument("--train-on-existing", action="store_true",
                    help="also tokenize every text ingested before (queue/done/) with this model's tokenizer")
    ms = add(msub, "show", "one model's configuration, tokenizer, progress and generation defaults", cmd_model_show)
    ms.add_argument("name")
    mr = add(msub, "rm", "remove a model (not the active one) with its checkpoints and data", cmd_model_rm)
    mr.add_argument("name")
    add(sub, "checkpoint", "write a training checkpoint now", _write_op("checkpoint", "checkpoint"))

    tk = add(sub, "tokenize", "token ids and count of a text", cmd_tokenize)
    tk.add_argument("text", nargs="?", help="the text (default, or '-': stdin)")
    dt = add(sub, "detokenize", "the text of token ids", cmd_detokenize)
    dt.add_argument("ids", nargs="+", type=_int_at_least(0), metavar="ID")

    pg = add(sub, "ping", "check the daemon answers, with the round-trip time", cmd_ping)
    pg.add_argument("-c", "--count", type=_int_at_least(1), default=1, metavar="N", help="pings to send")
    pg.add_argument("-i", "--interval", type=float, default=0.2, metavar="SECONDS",
                    help="pause between pings (default 0.2)")

    # Listed here for --help; their arguments are parsed by cllm.crawl and cllm.status.
    sub.add_parser("crawl", help="crawl web pages politely into the training queue (cllm crawl --help)",
                   add_help=False)
    sub.add_parser("top", help="the live view of training and the 12 spheres (cllm-status)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ctx = None
    try:
        split = _split_passthrough(argv)
        if split is not None:
            head, name, rest = split
            ctx = Ctx(parser.parse_args(head))
            return (run_crawl if name == "crawl" else run_top)(ctx, rest)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        ctx = Ctx(args)
        return args.func(ctx, args)
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except DaemonNotRunning as e:
        _error(ctx, "not_running", str(e), plain=True)
        return EXIT_USAGE
    except RequestError as e:
        _error(ctx, e.code, e.message)
        return EXIT_DAEMON
    except ClientError as e:   # permission denied, refused CURVE key: cannot talk to it
        _error(ctx, "unreachable", str(e), plain=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python would complain again at exit when flushing stdout: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        if ctx is not None:
            ctx.close()


def _error(ctx: Ctx | None, code: str, message: str, plain: bool = False) -> None:
    """Errors on stderr as one line (`cllm: CODE: MESSAGE`), and as JSON on stdout with --json."""
    print(f"cllm: {message}" if plain else f"cllm: error {code}: {message}", file=sys.stderr)
    if ctx is not None and ctx.json:
        print(json.dumps({"error": {"code": code, "message": message}}))


if __name__ == "__main__":
    sys.exit(main())
