"""`cllm chat`: an interactive conversation with the daemon's model, keeping as much history as
fits the context window, with /system, /reset, /save, /set; Ctrl-C stops an answer, a second
Ctrl-C (or Ctrl-D) leaves. Also the sampling options shared with `cllm generate`."""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from cllm.catalogue import (  # noqa: F401  (unescape: re-exported)
    MAX_STOPS, SCALAR_SAMPLING, SamplingOption, check_stops, parse_sampling, unescape,
)
from cllm.catalogue import SAMPLING as CATALOGUE_SAMPLING
from cllm.client import Client, DaemonNotRunning, DaemonStarting, RequestError
from cllm import layout
from cllm.durable import atomic_path, atomic_write
from cllm.fmt import human_count, number, use_color

# --------------------------------------------------------------------------- sampling options


# The scalar sampling options (the list of stop strings is kept apart): the catalogue's.
SAMPLING: dict[str, SamplingOption] = {k: CATALOGUE_SAMPLING[k] for k in SCALAR_SAMPLING}


def check_option(name: str, value: Any) -> Any:
    """A typed value (from a saved conversation) checked against its option; ValueError."""
    try:
        return SAMPLING[name].kind.value(value, from_text=False)
    except ValueError as e:
        raise ValueError(f"{name} {e}") from None


@contextlib.contextmanager
def ctrl_c_cancels(gen) -> Iterator[dict]:
    """While a generation streams, the first Ctrl-C asks the daemon to cancel it: the stream
    then ends normally, with the pieces already in flight and a done event whose stop_reason
    is "cancelled", so nothing is lost. A second Ctrl-C raises KeyboardInterrupt. Yields a map
    whose "interrupted" turns true on the first Ctrl-C."""
    state = {"interrupted": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_sigint(signum, frame):
        if state["interrupted"] or gen.done:
            raise KeyboardInterrupt
        state["interrupted"] = True
        gen.cancel(wait=False)   # only queues the cancel request; the loop reads on

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- the conversation

USER, ASSISTANT = "User", "Assistant"
TURN_STOP = f"\n{USER}:"   # the model starting the user's next line ends its answer


@dataclass
class Turn:
    user: str
    assistant: str
    stopped: bool = False   # the answer was cut by Ctrl-C


@dataclass
class ChatSession:
    """The conversation and how it becomes a prompt. The prompt is a plain transcript::

        SYSTEM\\n\\n
        User: ...\\nAssistant: ...\\n      (older turns, as many as fit)
        User: MESSAGE\\nAssistant:

    Older turns are dropped first so that the prompt fits the context minus the room kept for
    the answer: min(max_tokens, context / 4), because generation slides its window past the
    context, so a longer answer forgets the oldest prompt tokens rather than failing. The
    newest earlier turn that does not fit whole is kept with its answer cut short, so the
    model sees the turn before even when it was long (with the defaults, max_tokens 128 and a
    context of 128, a whole answer never fits). Token counts come from the daemon's tokenizer, one piece (system block
    or turn) at a time, cached.
    """
    client: Client
    context: int
    system: str = ""
    options: dict = field(default_factory=dict)
    stops: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    _counts: dict = field(default_factory=dict, repr=False)

    def count(self, text: str) -> int:
        if not text:
            return 0
        if text not in self._counts:
            self._counts[text] = self.client.request("tokenize", text=text)["count"]
        return self._counts[text]

    def room(self) -> int:
        """Tokens the prompt may take: the context minus the room kept for the answer."""
        max_tokens = self.options.get("max_tokens") or SAMPLING["max_tokens"].default
        return max(1, self.context - min(max_tokens, self.context // 4))

    @staticmethod
    def render_turn(t: Turn) -> str:
        return f"{USER}: {t.user}\n{ASSISTANT}: {t.assistant}\n"

    def system_block(self) -> str:
        return f"{self.system}\n\n" if self.system else ""

    def build(self, message: str) -> tuple[str, int, int]:
        """(prompt, its token count, turns left out) for the next message."""
        head = self.system_block()
        tail = f"{USER}: {message}\n{ASSISTANT}:"
        used = self.count(head) + self.count(tail)
        kept: list[str] = []
        for t in reversed(self.turns):
            piece = self.render_turn(t)
            n = self.count(piece)
            if used + n > self.room():
                piece, n = self._shortened(t, self.room() - used)
                if piece:
                    kept.append(piece)
                    used += n
                break
            kept.append(piece)
            used += n
        return head + "".join(reversed(kept)) + tail, used, len(self.turns) - len(kept)

    def _shortened(self, t: Turn, room: int) -> tuple[str, int]:
        """The turn with its answer cut (marked "...") to fit ``room`` tokens, or ("", 0) when
        not even the question and the start of the answer fit."""
        answer = t.assistant
        lo, hi, best = 1, len(answer) - 1, ("", 0)
        while lo <= hi:   # the longest start that fits, by bisection (about log2(len) tokenizes)
            mid = (lo + hi) // 2
            piece = self.render_turn(Turn(t.user, answer[:mid].rstrip() + " ...", t.stopped))
            n = self.count(piece)
            if n <= room:
                best, lo = (piece, n), mid + 1
            else:
                hi = mid - 1
        return best

    def generate(self, message: str):
        """Start the answer to `message`: (Generation, prompt tokens, turns left out)."""
        prompt, used, dropped = self.build(message)
        stops = [TURN_STOP] + [s for s in self.stops if s != TURN_STOP]
        opts = {k: v for k, v in self.options.items() if v is not None}
        return self.client.generate(prompt, stop=stops[:MAX_STOPS], **opts), used, dropped

    def record(self, message: str, answer: str, stopped: bool = False) -> None:
        self.turns.append(Turn(message, answer.strip(), stopped))

    def reset(self) -> None:
        self.turns.clear()

    def to_dict(self) -> dict:
        return {"system": self.system, "options": self.options, "stops": self.stops,
                "turns": [asdict(t) for t in self.turns]}

    def load(self, path: Path) -> None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            self.system = str(data.get("system") or "")
            self.options = {k: check_option(k, v) if v is not None else None
                            for k, v in (data.get("options") or {}).items() if k in SAMPLING}
            self.stops = check_stops([str(x) for x in data.get("stops") or []])
            self.turns = [Turn(str(t["user"]), str(t["assistant"]), bool(t.get("stopped")))
                          for t in data.get("turns") or []]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise LoadError(f"cannot load a chat from {path}: {e}") from None

    def save(self, path: Path) -> str:
        """JSON (for --load) when the name ends in .json, else the plain transcript."""
        path = Path(path).expanduser()
        if path.suffix.lower() == ".json":
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        else:
            text = self.system_block() + "".join(self.render_turn(t) for t in self.turns)
        atomic_write(path, text, mode=0o644)  # a transcript the user asked for, like any file
        return str(path)


# --------------------------------------------------------------------------- the interactive loop

HELP = """\
/system TEXT      set the system prompt (no TEXT: show it; /system none clears it)
/reset            forget the conversation (the system prompt stays)
/save FILE        write the conversation (FILE.json: reloadable with --load)
/set KEY VALUE    change a sampling option (no argument: show them all), e.g. /set temperature 0.7
                  keys: {keys}, stop
/show             the prompt the next message would be sent with
/help             this text; /quit, /exit or Ctrl-D to leave
Ctrl-C stops an answer; a second Ctrl-C leaves."""


class LoadError(ValueError):
    """A conversation file that cannot be loaded (--load)."""


class Leave(Exception):
    """The user asked to leave (Ctrl-C twice, Ctrl-D, /quit)."""


class ChatLoop:
    """Reads lines, runs commands and streams answers. `interactive`: prompts and hints for a
    person at a terminal; `as_json`: one JSON object per line out, for scripts."""

    def __init__(self, session: ChatSession, *, out: TextIO = sys.stdout,
                 read: Callable[[str], str] = input, interactive: bool = True, as_json: bool = False,
                 model: str = "the model"):
        self.s = session
        self.model = model
        self.out = out
        self.read = read
        self.interactive = interactive and not as_json
        self.as_json = as_json
        color = self.interactive and use_color(out)
        self.dim = ("\x1b[2m", "\x1b[0m") if color else ("", "")
        self.last_was_interrupt = False

    # output helpers
    def say(self, text: str) -> None:
        if not self.as_json:
            self.out.write(text + "\n")
            self.out.flush()

    def note(self, text: str) -> None:
        self.say(f"{self.dim[0]}{text}{self.dim[1]}")

    def emit(self, obj: dict) -> None:
        if self.as_json:
            self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
            self.out.flush()

    def run(self) -> int:
        if self.interactive:
            self.note(f"cllm chat with {self.model} (context {self.s.context} tokens). "
                      "/help for commands, Ctrl-D to leave.")
        while True:
            try:
                line = self.read(">>> " if self.interactive else "")
            except EOFError:
                if self.interactive:
                    self.say("")
                return 0
            except KeyboardInterrupt:
                if self.last_was_interrupt:
                    self.say("")
                    return 0
                self.last_was_interrupt = True
                self.say("")
                self.note("(Ctrl-C again or Ctrl-D to leave)")
                continue
            self.last_was_interrupt = False
            try:
                self.handle(line)
            except Leave:
                return 0
            except (DaemonNotRunning, DaemonStarting) as e:
                self._lost(e)
                if not self.wait_for_daemon():
                    return 1
                self.note("(cllmd is back: send that message again)")
            except RequestError as e:
                if e.code != "unavailable":   # shutting down: a restart on its way
                    raise
                self._lost(e)
                if not self.wait_for_daemon():
                    return 1
                self.note("(cllmd is back: send that message again)")

    def _lost(self, e: Exception) -> None:
        # the daemon restarted (or is on its way): keep the conversation, wait for it
        self.note(f"({e}: waiting for cllmd; the conversation is kept, Ctrl-C stops waiting)")

    def wait_for_daemon(self, poll: float = 0.5) -> bool:
        """Ping until the daemon serves again; False when interrupted (Ctrl-C)."""
        try:
            while True:
                try:
                    if "starting" not in self.s.client.request("ping", timeout=2):
                        return True
                except (DaemonNotRunning, RequestError):
                    pass
                time.sleep(poll)
        except KeyboardInterrupt:
            self.say("")
            return False

    def handle(self, line: str) -> None:
        text = line.strip()
        if not text:
            return
        if text.startswith("/"):
            self.command(text)
        else:
            self.answer(text)

    def command(self, text: str) -> None:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        name = name.lower()
        try:
            message = self._command(name, arg)
        except ValueError as e:
            self.say(f"error: {e}")
            self.emit({"command": name, "ok": False, "error": str(e)})
            return
        if message:
            self.say(message)
        self.emit({"command": name, "ok": True, "message": message})

    def _command(self, name: str, arg: str) -> str:
        s = self.s
        if name in ("/quit", "/exit", "/bye"):
            raise Leave
        if name in ("/help", "/?"):
            return HELP.format(keys=", ".join(SAMPLING))
        if name == "/system":
            if not arg:
                return f"system prompt: {s.system!r}" if s.system else "no system prompt"
            s.system = "" if arg.lower() == "none" else arg
            return "system prompt cleared" if not s.system else f"system prompt set ({s.count(s.system_block())} tokens)"
        if name == "/reset":
            n = len(s.turns)
            s.reset()
            return f"conversation reset ({n} turn{'s' if n != 1 else ''} forgotten)"
        if name == "/save":
            if not arg:
                raise ValueError("/save needs a file name")
            try:
                return f"saved to {s.save(Path(arg))}"
            except OSError as e:
                raise ValueError(f"cannot write {arg}: {e.strerror or e}") from None
        if name == "/set":
            return self._set(arg)
        if name == "/show":
            return s.build("<your next message>")[0]
        raise ValueError(f"unknown command {name} (/help lists them)")

    def _set(self, arg: str) -> str:
        s = self.s
        if not arg:
            def unset(k):  # not sent: the daemon applies the model's own default, else this
                return "fresh each time" if SAMPLING[k].default is None else \
                    f"default (the model's, else {SAMPLING[k].default})"
            lines = [f"{k:15} {unset(k) if s.options.get(k) is None else s.options[k]}" for k in SAMPLING]
            lines.append(f"{'stop':15} {', '.join(map(repr, s.stops)) or '-'}")
            return "\n".join(lines)
        key, _, value = arg.partition(" ")
        key = key.replace("-", "_").lower()
        value = value.strip()
        if key == "stop":
            s.stops = [] if value.lower() in ("", "none") else check_stops([unescape(value)])
            return f"stop = {s.stops!r}"
        if key not in SAMPLING:
            raise ValueError(f"unknown setting {key!r} (one of: {', '.join(SAMPLING)}, stop)")
        if not value:
            raise ValueError(f"/set {key} needs a value")
        s.options[key] = parse_sampling(key, value)
        return f"{key} = {s.options[key]}"

    def _show(self, text: str, shown: int) -> int:
        """Writes text[shown:], leaving out the answer's leading blanks (the transcript puts a
        space after "Assistant:"); returns the new count."""
        if self.as_json:
            return len(text)
        if shown == 0:
            start = len(text) - len(text.lstrip())
            if start == len(text):
                return 0
            shown = start
        self.out.write(text[shown:])
        self.out.flush()
        return len(text)

    def answer(self, message: str) -> None:
        s = self.s
        gen, used, dropped = s.generate(message)
        if dropped and self.interactive:
            self.note(f"({dropped} earlier turn{'s' if dropped != 1 else ''} left out to fit the context)")
        if used > s.context:
            self.note(f"(the prompt takes {used} tokens, over the context of {s.context}: "
                      "the model sees only its end)")
        shown = 0   # characters of gen.text written so far
        try:
            with ctrl_c_cancels(gen) as ctrl_c:
                for _ in gen:
                    shown = self._show(gen.text, shown)
        except KeyboardInterrupt:   # a second Ctrl-C while the answer was being stopped
            raise Leave from None
        finally:
            gen.close()
        stopped = ctrl_c["interrupted"]
        stats = gen.stats or {}
        stopped = stopped or stats.get("stop_reason") == "cancelled"
        s.record(message, gen.text, stopped)
        total = min(s.context, (stats.get("tokens_prompt") or used) + (stats.get("tokens_generated") or 0))
        if self.as_json:
            self.emit({"user": message, "assistant": gen.text.strip(), "stopped": stopped,
                       "context_used": total, "context": s.context, **stats})
            return
        self.say("")
        head = "[stopped · " if stopped else "["
        self.note(f"{head}{human_count(stats.get('tokens_generated', 0))} tokens, "
                  f"{number(stats.get('tokens_per_second'), '.1f')} tokens/s · "
                  f"context {total}/{s.context}]")
        if stopped:
            # "Ctrl-C stops the current answer and a second Ctrl-C leaves"
            self.last_was_interrupt = True


def history_file() -> Path:
    return layout.client_state_dir() / "chat_history"


def setup_readline() -> Callable[[], None]:
    """Line editing, persistent history and /command completion; returns the saver to call on exit."""
    try:
        import readline
    except ImportError:   # not every Python has it; input() still works
        return lambda: None
    path = history_file()
    try:
        readline.read_history_file(path)
    except (OSError, UnicodeDecodeError):
        pass
    readline.set_history_length(1000)
    words = ["/system", "/reset", "/save", "/set", "/show", "/help", "/quit", "/exit"] + \
            [f"/set {k}" for k in [*SAMPLING, "stop"]]

    def complete(text: str, state: int) -> str | None:
        line = readline.get_line_buffer()
        hits = [w[len(line) - len(text):] for w in words if w.startswith(line)]
        return hits[state] if state < len(hits) else None

    readline.set_completer_delims(" ")
    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")

    def save() -> None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                readline.write_history_file(tmp)
        except OSError:
            pass
    return save


def run(client: Client, *, system: str = "", options: dict | None = None, stops: list[str] | None = None,
        load: Path | None = None, as_json: bool = False) -> int:
    """The `cllm chat` command body (the caller maps exceptions to exit codes)."""
    model = client.request("status")["model"]
    context = model["context"]
    session = ChatSession(client, context)
    if load is not None:
        session.load(load)
    # what the command line gives wins over what the loaded conversation had
    session.system = system or session.system
    session.options.update(options or {})
    session.stops = list(stops or []) or session.stops
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    save_history = setup_readline() if interactive and not as_json else (lambda: None)
    try:
        return ChatLoop(session, interactive=interactive, as_json=as_json, model=model.get("name", "?")).run()
    finally:
        save_history()


__all__ = ["SAMPLING", "check_option", "check_stops", "ChatSession", "ChatLoop", "Turn", "LoadError", "run"]
