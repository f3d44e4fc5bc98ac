"""Secret scrubbing: environment values that must never reach a dry-run listing, SQLite or a log."""

from __future__ import annotations

import os
from typing import Mapping, Optional

from engine.spec import Preset

SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
REDACTED = "***"
SECRET_MIN_LEN = 4  # shorter values would scrub ordinary words


def is_secret(name: str) -> bool:
    return any(m in name.upper() for m in SECRET_MARKERS)


def redact(env: Mapping[str, str]) -> dict[str, str]:
    """A copy with values of secret-looking variables (…TOKEN…, …KEY…, …SECRET…, …PASSWORD…) masked."""
    return {k: (REDACTED if is_secret(k) else v) for k, v in env.items()}


def secret_values(preset: Optional[Preset] = None, env=None) -> list[str]:
    """Values of secret-looking variables (…TOKEN…, …KEY…, …SECRET…, …PASSWORD…) that must never be
    written to SQLite or logs: from the environment and the preset's cluster / node env."""
    envs = [dict(os.environ if env is None else env)]
    if preset is not None:
        envs.append(preset.cluster.env)
        envs += [n.env for n in preset.cluster.nodes]
    vals = set()
    for e in envs:
        for k, v in e.items():
            if is_secret(k) and v and len(v) >= SECRET_MIN_LEN:
                vals.add(v)
    return sorted(vals, key=len, reverse=True)


def scrub(text: str, secret_vals: list[str]) -> str:
    for v in secret_vals:
        text = text.replace(v, REDACTED)
    return text
