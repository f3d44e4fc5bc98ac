"""What the CLI's commands share: exit codes and opening a run by id."""

from __future__ import annotations

from cpt_tui import paths
from cpt_tui.presets import Invalid

EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 1, 2, 130


def open_store_ro(a):
    """The database of `--db` for reading, or None when there is none yet."""
    from cpt_tui.store import Store

    p = paths.db_path(a.db)
    if not p.exists():
        return None
    return Store(p, readonly=True)


def run_row(a, store=None):
    """(store, run) for `a.run_id` (a unique prefix is enough); Invalid when there is no such run."""
    store = store or open_store_ro(a)
    run = store.run(a.run_id) if store else None
    if run is None:
        raise Invalid(f"{a.run_id}: no such run (see `cpt-tui runs`)")
    return store, run
