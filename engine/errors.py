"""One hierarchy for errors a user sees (the CLI prints the message, never a traceback).

    CptError            exit_code 1
      UserError         exit_code 2: bad input the user fixes (preset, data, paths, a node)
        PresetError, PlanError, DataError (engine), Invalid, LaunchError (cpt_tui)
      RunFailed         exit_code 1: a run ended in failure (cpt_tui)

Lives in engine/ because both sides raise these and engine/ imports nothing from cpt_tui.
"""

from __future__ import annotations


class CptError(Exception):
    """A failure with a message meant for the user."""

    exit_code = 1


class UserError(CptError):
    """Invalid input: the message names the file / YAML path / node and what to do."""

    exit_code = 2
