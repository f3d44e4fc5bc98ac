"""Compatibility names for callers not yet moved to the new homes (cli.py, ui/screens/launch.py,
bench/train.py): launch backends are in cpt_tui/backends, process control (keeper, guard, start,
terminate) in cpt_tui/procs, secret redaction in cpt_tui/redact. New code imports from those.
"""

from __future__ import annotations

from cpt_tui.backends import (LaunchError, NodeCommand, build_commands, build_telemetry_commands, dry_run,
                              format_commands, preflight)
from cpt_tui.backends.accelerate import deepspeed_config
from cpt_tui.procs import DEFAULT_KILL_GRACE, _GUARD, start, terminate
from cpt_tui.redact import redact

__all__ = ["LaunchError", "NodeCommand", "build_commands", "build_telemetry_commands", "deepspeed_config",
           "dry_run", "format_commands", "preflight", "redact", "start", "terminate", "DEFAULT_KILL_GRACE", "_GUARD"]
