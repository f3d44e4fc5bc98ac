"""The walking skeleton end to end: `cpt-tui --run tiny-demo` through the real CLI and a real
`accelerate launch` subprocess, recorded in a real SQLite file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from engine.events import read_events
from tests.demo_run import run_cli


def _db(demo_run):
    con = sqlite3.connect(demo_run.db)
    con.row_factory = sqlite3.Row
    return con


def test_demo_run_succeeds_and_is_done_in_sqlite(demo_run):
    r = demo_run.result
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # A progress line per logging step: stage, step, tokens, loss, lr, tokens/s.
    lines = [l for l in r.stdout.splitlines() if " step " in l and "loss" in l and "tok/s" in l]
    assert any(l.startswith("[base]") for l in lines) and any(l.startswith("[cpt-code]") for l in lines)
    con = _db(demo_run)
    run = con.execute("SELECT * FROM runs WHERE id = ?", [demo_run.run_id]).fetchone()
    assert run["status"] == "done"
    stages = con.execute("SELECT * FROM stages WHERE run_id = ? ORDER BY idx", [run["id"]]).fetchall()
    assert [s["name"] for s in stages] == ["base", "cpt-code"]
    assert all(s["status"] == "done" and s["exit_code"] == 0 for s in stages)
    print(f"demo run took {demo_run.seconds:.0f}s")


def test_metric_rows_equal_events_and_loss_falls(demo_run):
    con = _db(demo_run)
    run = con.execute("SELECT * FROM runs WHERE id = ?", [demo_run.run_id]).fetchone()
    for stage in ("base", "cpt-code"):
        events, _ = read_events(Path(run["run_dir"]) / "stages" / stage / "events.jsonl")
        metric_events = [(e["seq"], e["step"], e["loss"]) for e in events if e["type"] == "metric"]
        rows = [tuple(r) for r in con.execute(
            "SELECT seq, step, loss FROM metrics WHERE run_id = ? AND stage = ? ORDER BY seq", [run["id"], stage])]
        assert rows == metric_events and len(rows) > 5
        first, last = rows[0][2], rows[-1][2]
        assert last < first - 0.5, (stage, first, last)  # clearly below its start
        # The raw events table holds every record exactly once.
        assert con.execute("SELECT COUNT(*) FROM events WHERE run_id = ? AND stage = ?",
                           [run["id"], stage]).fetchone()[0] == len(events)


def test_validation_per_domain_for_both_domains(demo_run):
    con = _db(demo_run)
    rows = con.execute("SELECT stage, domain, step, loss FROM eval WHERE run_id = ? ORDER BY ts, seq",
                       [demo_run.run_id]).fetchall()
    for stage in ("base", "cpt-code"):
        domains = {r["domain"] for r in rows if r["stage"] == stage}
        assert domains == {"prose", "code"}, (stage, domains)
    code = [r["loss"] for r in rows if r["domain"] == "code" and r["stage"] == "cpt-code"]
    assert code[-1] < code[0]  # CPT on code lowers the code validation loss


def test_exported_model_reloads_and_generates(demo_run):
    """The exported model, loaded by plain transformers, is the trained one: its loss on the stage's
    validation blocks equals the engine's last evaluation, per domain; and greedy generation runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.train import val_blocks

    con = _db(demo_run)
    run_dir = Path(con.execute("SELECT run_dir FROM runs WHERE id = ?", [demo_run.run_id]).fetchone()[0])
    stage_dir = run_dir / "stages" / "cpt-code"
    final = stage_dir / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, torch_dtype=torch.float32).eval()
    cfg = json.loads((stage_dir / "stage.json").read_text())
    events, _ = read_events(stage_dir / "events.jsonl")
    last_step = max(e["step"] for e in events if e["type"] == "eval")
    last = {e["domain"]: e["loss"] for e in events if e["type"] == "eval" and e["step"] == last_step}
    assert set(last) == {"prose", "code"} and last_step == cfg_steps(events)
    blocks = val_blocks(cfg, cfg["stage"]["seq_len"], cfg["stage"]["eval"]["max_blocks"])
    for domain, b in blocks.items():
        with torch.no_grad():
            ours = float(sum(model(input_ids=x[None], labels=x[None]).loss.item() for x in b) / len(b))
        assert abs(ours - last[domain]) < 2e-3, (domain, ours, last[domain])
    ids = tok("def main(", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 12 or out[0, -1] == tok.eos_token_id
    assert torch.equal(out[0, :ids.shape[1]], ids[0]) and tok.decode(out[0][ids.shape[1]:]).strip()


def cfg_steps(events) -> int:
    """The stage's last step (its final evaluation is made there)."""
    return max(e["step"] for e in events if e["type"] == "metric")


def test_runs_and_show_read_sqlite(demo_run):
    r = run_cli(["runs", "--json"], demo_run.env)
    assert r.returncode == 0
    runs = json.loads(r.stdout)
    # other tests add runs to the demo's database (tests/test_from_stage.py starts one from its first stage)
    demo = [x for x in runs if x["id"] == demo_run.run_id]
    assert len(demo) == 1 and demo[0]["status"] == "done" and demo_run.run_id == min(x["id"] for x in runs)
    r = run_cli(["show", demo_run.run_id, "--json"], demo_run.env)
    data = json.loads(r.stdout)
    assert [s["status"] for s in data["stages"]] == ["done", "done"]
    r = run_cli(["show", demo_run.run_id], demo_run.env)
    assert "validation:" in r.stdout and "prose" in r.stdout
    r = run_cli(["show", "no-such-run"], demo_run.env)
    assert r.returncode == 2 and "no such run" in r.stderr
