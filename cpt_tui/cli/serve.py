"""`cpt-tui serve [--host 127.0.0.1] [--port 8566] [--public]`: the same Textual UI in a browser,
through textual-serve (each browser tab runs `cpt-tui` — the UI — in its own process, on this
machine, with this database).

There is no authentication: whoever reaches the page can start, stop and edit runs as you. So it
binds to loopback by default (reach it from elsewhere with `ssh -L 8566:127.0.0.1:8566 host`), and a
non-loopback --host needs an explicit --public. SIGTERM / Ctrl-C stop the server and its UI processes.
"""

from __future__ import annotations

import ipaddress
import shlex
import sys

from cpt_tui import paths
from cpt_tui.cli.common import EXIT_INVALID


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def ui_command(db) -> str:
    """What textual-serve runs for every browser session: the terminal UI on the same database."""
    return shlex.join([sys.executable, "-m", "cpt_tui.cli", "--db", str(db)])


def cmd_serve(a) -> int:
    if not is_loopback(a.host) and not a.public:
        print(f"error: refusing to serve on {a.host}: it is not a loopback address, and the browser view has no "
              "authentication (anyone who reaches it controls your runs). Use the default --host 127.0.0.1 with an "
              "ssh tunnel (ssh -L 8566:127.0.0.1:8566 HOST), or add --public if this network is trusted.",
              file=sys.stderr)
        return EXIT_INVALID
    try:
        from textual_serve.server import Server
    except ImportError:
        print("error: `cpt-tui serve` needs textual-serve: pip install 'cpt-tui[serve]'", file=sys.stderr)
        return EXIT_INVALID
    db = paths.db_path(a.db).resolve()
    url = f"http://{'[' + a.host + ']' if ':' in a.host else a.host}:{a.port}"
    print(f"cpt-tui: serving the UI at {url}  (database {db}; Ctrl-C stops)", flush=True)
    Server(ui_command(db), host=a.host, port=a.port, title="cpt-tui", public_url=url).serve()
    return 0
