"""Words for a POSIX shell on a node. Over ssh the remote side needs one command string: it is
assembled from words each quoted exactly once, so a workdir, path, python or env value containing
shell metacharacters reaches the remote side literally (`~/x` is expanded there as `"$HOME"/'x'`)."""

from __future__ import annotations

import re
import shlex
from typing import Iterable, Mapping, Sequence, Union

from cpt_tui.backends import LaunchError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TILDE_USER = re.compile(r"^~([A-Za-z0-9._][A-Za-z0-9._-]*)?(/.*)?$", re.DOTALL)


class _Sh(str):
    """Shell text that is already quoted (inserted as is)."""


def _q(word: Union[str, _Sh]) -> str:
    return str(word) if isinstance(word, _Sh) else shlex.quote(word)


def _join(words: Iterable[Union[str, _Sh]]) -> str:
    return " ".join(_q(w) for w in words)


def remote_path(path: str) -> Union[str, _Sh]:
    """A path word for the remote shell: `~`, `~/rest`, `~user/rest` expand there, the rest is literal."""
    m = _TILDE_USER.match(path)
    if not m:
        return path
    user, rest = m.group(1) or "", m.group(2) or ""
    head = f"~{user}" if user else '"$HOME"'
    if not rest:
        return _Sh(head)
    rest = rest[1:]
    return _Sh(head + "/" + (shlex.quote(rest) if rest else ""))


def check_env(env: Mapping[str, str], where: str) -> dict[str, str]:
    """Valid variable names and no NUL bytes (raises LaunchError naming `where`); values as str."""
    for k, v in env.items():
        if not _ENV_NAME.match(k):
            raise LaunchError(f"{where}: environment variable name {k!r} is not valid (letters, digits, _)")
        if "\0" in str(v):
            raise LaunchError(f"{where}: the value of {k} contains a NUL byte")
    return {k: str(v) for k, v in env.items()}


def remote_script(workdir: str, env: Mapping[str, str], python: str, rest: Sequence[Union[str, _Sh]],
                  *, on_missing_dir: str = "&&") -> str:
    """`cd -- <workdir> && exec env K=V ... <python> <rest...>` with every value quoted once."""
    if "=" in python:
        raise LaunchError(f"python {python!r}: the path must not contain '=' (it would be read as a variable)")
    words: list[Union[str, _Sh]] = [_Sh("exec"), _Sh("env")]
    words += [_Sh(k + "=" + shlex.quote(v)) for k, v in env.items()]
    words.append(remote_path(python))
    words += list(rest)
    return f"cd -- {_q(remote_path(workdir))} {on_missing_dir} {_join(words)}"


def placeholder(text: str) -> _Sh:
    """A word shown as is in a listing (e.g. `<guard>` for the guard's code)."""
    return _Sh(text)
