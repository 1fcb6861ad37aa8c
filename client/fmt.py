"""Small text formatters shared by the `cllm` command, the chat and the `cllm-status` view:
human sizes, counts and durations, sparklines, and the NO_COLOR / terminal checks."""
from __future__ import annotations

import math
import os
from typing import Iterable, TextIO

DASH = "-"
SPARK_UNICODE = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-~=+*#"


def use_color(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set to a non-empty value
    (https://no-color.org) or TERM is dumb."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def unicode_ok(encoding: str | None) -> bool:
    return (encoding or "").lower().replace("-", "").replace("_", "") in ("utf8", "utf8mb4")


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB' (binary units, as `ls -h` and htop show memory)."""
    if n is None:
        return DASH
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float | None) -> str:
    """12345 -> '12.3k', 1234567 -> '1.23M' (at most 5 characters for counts below 10^15)."""
    if n is None:
        return DASH
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f}" if n == int(n) else f"{n:.1f}"
    for unit in ("k", "M", "G", "T"):
        n /= 1000
        if abs(n) < 1000 or unit == "T":
            if abs(n) < 10:
                return f"{n:.2f}{unit}"
            if abs(n) < 100:
                return f"{n:.1f}{unit}"
            return f"{n:.0f}{unit}"
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    """0.42 -> '0.4s', 75 -> '1m15s', 3725 -> '1h02m', 2 days -> '2d03h'."""
    if seconds is None or not math.isfinite(seconds):
        return DASH
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def number(x: float | None, spec: str = ".3f") -> str:
    """A float with `spec`, or a dash when unknown (nil on the wire) or not finite."""
    if x is None:
        return DASH
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def sparkline(values: Iterable[float | None], width: int, unicode: bool = True) -> str:
    """The last `width` values as a bar per value, scaled between their min and max."""
    chars = SPARK_UNICODE if unicode else SPARK_ASCII
    vals = [v for v in values if v is not None and math.isfinite(v)][-width:] if width > 0 else []
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo
    top = len(chars) - 1
    if span <= 0:
        return chars[top // 2] * len(vals)
    return "".join(chars[min(top, int((v - lo) / span * top + 0.5))] for v in vals)


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"
