"""`cpt-tui --run PRESET --from-stage NAME --init-from RUN[:STAGE]|DIR`: the plan from a stage, started
from a finished stage of another run. On the tiny demo from the session's finished run's first stage,
the second stage's losses equal those of the uninterrupted two-stage run (fp32), and the run records
its lineage (show --json)."""

from __future__ import annotations

import json
import sqlite3

from tests.demo_run import run_cli, wait_for


def _losses(db, run_id, stage):
    with sqlite3.connect(db) as con:
        return [tuple(r) for r in con.execute(
            "SELECT step, loss FROM metrics WHERE run_id = ? AND stage = ? ORDER BY step", [run_id, stage])]


def test_from_stage_refusals_exit_2_and_create_nothing(demo_run):
    env = demo_run.env
    assert demo_run.result.returncode == 0, demo_run.result.stderr
    with sqlite3.connect(demo_run.db) as con:
        n_runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    for args, want in (
        (["--from-stage", "nope"], "no such stage"),
        (["--from-stage", "cpt-code"], "--init-from"),
        (["--from-stage", "cpt-code", "--init-from", "no-such-run-or-dir"], "neither an existing directory nor a run"),
        (["--from-stage", "cpt-code", "--init-from", f"{demo_run.run_id}:nostage"], "no stage 'nostage'"),
        (["--init-from", demo_run.run_id], "needs --from-stage"),
    ):
        r = run_cli(["--run", "tiny-demo", "--detach", *args], env, timeout=120)
        assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    with sqlite3.connect(demo_run.db) as con:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == n_runs


def test_from_stage_equals_the_uninterrupted_run(demo_run):
    env = demo_run.env
    assert demo_run.result.returncode == 0, demo_run.result.stderr
    first = demo_run.run_id
    r = run_cli(["--run", "tiny-demo", "--from-stage", "cpt-code", "--init-from", first], env, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run_id = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("run "))
    assert run_id != first
    want, got = _losses(demo_run.db, first, "cpt-code"), _losses(demo_run.db, run_id, "cpt-code")
    assert len(got) >= 10 and got == want  # the same losses, bit for bit (fp32, the same machine)
    assert _losses(demo_run.db, run_id, "base") == []  # the first stage did not run again
    show = json.loads(run_cli(["show", run_id, "--json"], env).stdout)
    assert [s["status"] for s in show["stages"]] == ["skipped", "done"]
    lin = show["lineage"]
    assert lin["from_stage"] == "cpt-code" and lin["init_from"]["run"] == first
    assert lin["init_from"]["stage"] == "base" and lin["init_from"]["stages"] == ["base"]
    assert lin["init_from"]["tokens_before"] > 0


def test_from_stage_on_a_tiny_preset_equals_the_uninterrupted_run(cpt_home, tmp_path):
    """The same on the supervisor tests' tiny model (seconds, not minutes), from a directory too."""
    from tests.demo_run import tiny_preset
    from tests.test_supervisor import run_row, start, wait_done

    env = cpt_home
    preset = tiny_preset(tmp_path / "p.yaml", [("a", 12), ("b", 12)], every=6, name="tiny-from")
    first = start(env, preset, "--telemetry-interval", "0")
    assert wait_done(env, first, 900)["status"] == "done"
    db = env["CPT_TUI_DB"]
    second = start(env, preset, "--from-stage", "b", "--init-from", f"{first}:a", "--telemetry-interval", "0")
    assert wait_done(env, second, 900)["status"] == "done"
    want = _losses(db, first, "b")
    assert len(want) == 12 and _losses(db, second, "b") == want and _losses(db, second, "a") == []
    # the curves show the lineage: stage a from the first run, then b, on one step / tokens axis
    from cpt_tui.store import Store
    from cpt_tui.ui.data import load_curves

    with Store(db, readonly=True) as st:
        c = load_curves(st, second)
    assert [s.name for s in c.stages] == [f"a ({first})", "b"]
    assert list(zip(c.step, c.loss)) == [(float(s), x) for s, x in _losses(db, first, "a") + [(12 + s, x) for s, x in want]]
    assert c.tokens[11] == c.stages[1].token_offset and c.tokens[12] > c.tokens[11]
    final_a = f"{run_row(env, first)['run_dir']}/stages/a/final"
    third = start(env, preset, "--from-stage", "b", "--init-from", final_a, "--telemetry-interval", "0")
    assert wait_done(env, third, 900)["status"] == "done"
    assert _losses(db, third, "b") == want
    show = json.loads(run_cli(["show", third, "--json"], env).stdout)
    assert show["lineage"] == {"from_stage": "b", "init_from": {"dir": final_a}}
