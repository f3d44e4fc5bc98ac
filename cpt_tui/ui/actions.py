"""What the UI does to runs. It never owns training: stop and resume go through the supervisor
(cpt_tui.lifecycle); delete removes a finished run's records (and its directory only when
asked). All of these block: call them from worker threads.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def stop_run(db_path: Path, run_id: str) -> str:
    from cpt_tui import lifecycle as S
    from cpt_tui.store import Store

    with Store(db_path) as store:
        return S.request_stop(store, run_id)


def resume_run(db_path: Path, run_id: str) -> str:
    from cpt_tui import lifecycle

    what, _, pid = lifecycle.resume(db_path, run_id)
    return {"done": "already done", "supervised": "already supervised"}.get(what, f"resumed (supervisor pid {pid})")


def delete_run(db_path: Path, run_id: str, with_files: bool = False) -> str:
    """Remove a run's rows. Its directory (checkpoints, final model, logs) stays unless `with_files`."""
    from cpt_tui import lifecycle as S
    from cpt_tui.store import TERMINAL, Store

    with Store(db_path, readonly=True) as store:
        run = store.run(run_id)
    if run is None:
        return "no such run"
    if run["status"] not in TERMINAL and S.supervisor_alive(run):
        raise RuntimeError(f"run {run_id} is {run['status']}: stop it first")
    with Store(db_path) as store:
        store.delete_run(run_id)
    if with_files and run["run_dir"] and Path(run["run_dir"]).is_dir():
        shutil.rmtree(run["run_dir"])
        return "deleted with its directory"
    return "deleted (directory kept)"
