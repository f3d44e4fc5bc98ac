"""Number and time formatting for the CLI and the UI: the one home of these helpers."""

from __future__ import annotations

import math
import time
from typing import Optional

SI_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def fmt_num(x, nd: int = 3) -> str:
    """Floats with `nd` decimals, integers with thousands separators, None as '-'."""
    if x is None:
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else f"{x:,}"


def fmt_si(x, unit: str = "", spec: str = ".3g", prefixes=SI_PREFIXES) -> str:
    """1234567 → 1.23M (`spec` formats the scaled value; `prefixes` the largest first)."""
    if x is None:
        return "-"
    for div, p in prefixes:
        if abs(x) >= div:
            return f"{x / div:{spec}}{p}{unit}"
    return f"{x:.0f}{unit}"


def fmt_duration(seconds: Optional[float]) -> str:
    """Compact: 5m07s, 2h03m, 1d04h; '-' when unknown."""
    if seconds is None or seconds != seconds or seconds == math.inf:
        return "-"
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def fmt_hms(seconds: float) -> str:
    """H:MM:SS (progress ETAs)."""
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_time(ts: Optional[float], spec: str = "%m-%d %H:%M") -> str:
    """A local time, '-' when unset."""
    return time.strftime(spec, time.localtime(ts)) if ts else "-"


def progress_bar(fraction: float, width: int = 10) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(fraction * width)
    return "█" * full + "░" * (width - full) + f" {fraction:4.0%}"
