"""`cluster.shared_fs: false`: nodes with private disks (tests/hosts.py `netns_private_nodes`: two
network namespaces, each sshd in its own mount namespace with a tmpfs workdir the manager cannot see).

Two runs are shared by the tests (module fixtures), to keep the file's wall time down:

- `two_stage`: a 2-stage run over 2 nodes × 1 process, node workdirs with spaces and shell syntax,
  uninterrupted. It completes; SQLite's metrics are exactly rank 0's events on the node; each stage's
  final/ is here and loads; the second stage re-sent none of the shards (rsync's literal bytes). Its
  first stage is also the reference of the kill -9 test.
- `interrupted`: the same first stage alone (the same seed, data and schedule), slowed down; the
  event stream's ssh client is killed mid-stage (it reconnects, every event arrives exactly once,
  the run shows the node disconnected meanwhile), then the trainer of node-b is killed with -9 after a
  checkpoint: the stage resumes from the nodes' own checkpoint and its losses equal `two_stage`'s (fp32).

And: a node whose workdir is too small → exit 2 at preflight (before any data preparation) naming
the node and the bytes; `plan --commands` lists the push / stream / pull commands.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.events import read_events
from tests.demo_run import ROOT, cli_env, tiny_preset, wait_for
from tests.hosts import netns_private_nodes, procs_matching  # noqa: F401  (fixture)

PY = sys.executable
MARK = "cpt-stream"
S1, S2 = ("s1", 24), ("s2", 16)


def cluster(nn, workdirs, **kw) -> dict:
    env = kw.pop("env", {})  # extra environment on every node
    nodes = [{"host": al, "workdir": workdirs[al], "python": PY, "address": nn.addresses[al],
              "env": {"PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": nn.ifnames[al], **env}}
             for al in nn.nodes]
    return {"kind": "ssh", "processes_per_node": 1, "ssh_options": ["-F", str(nn.ssh_config)],
            "nodes": nodes, "shared_fs": False, "main_process_port": kw.pop("port", 29530), **kw}


def cli(nn, args, env, **kw):
    return subprocess.run([*nn.prefix, PY, "-m", "cpt_tui.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, **kw)


def node_events(nn, alias, workdir, run_dir, stage) -> list[dict]:
    path = f"{workdir}/runs/{Path(run_dir).name}/stages/{stage}/events.jsonl"
    r = nn.ssh(alias, f"cat -- {shlex.quote(path)}")
    assert r.returncode == 0, r.stderr
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]


def run_row(db, run_id):
    con = sqlite3.connect(db)
    return con, Path(con.execute("SELECT run_dir FROM runs WHERE id = ?", [run_id]).fetchone()[0])


def losses(con, run_id, stage) -> dict[int, float]:
    """step → loss as the reads show it (each step once: the latest attempt's row)."""
    out = {}
    for step, loss in con.execute("SELECT step, loss FROM metrics WHERE run_id = ? AND stage = ? "
                                  "ORDER BY attempt, seq", [run_id, stage]):
        out[step] = loss
    return out


def run_events(con, run_id) -> list[dict]:
    return [json.loads(d) for (d,) in con.execute(
        "SELECT data FROM events WHERE run_id = ? AND stage = '@run' ORDER BY rowid", [run_id])]


@dataclass
class Run:
    res: subprocess.CompletedProcess
    env: dict
    wd: dict
    run_id: str
    run_dir: Path
    seconds: float
    extra: dict


def _home(tmp_path_factory, shared_cache, name) -> dict:
    home = tmp_path_factory.mktemp(name)
    return cli_env(home, shared_cache)


@pytest.fixture(scope="module")
def two_stage(netns_private_nodes, tmp_path_factory, shared_cache) -> Run:
    nn = netns_private_nodes
    env = _home(tmp_path_factory, shared_cache, "noshare-home")
    uniq = uuid.uuid4().hex[:8]
    pwned = Path(f"/tmp/pwned_{uniq}")
    wd = {al: f"{nn.workdirs[al]}/a b; touch {pwned} $(touch {pwned})" for al in nn.nodes}
    for al in nn.nodes:  # create the workdirs literally on the nodes
        r = nn.run(["ssh", "-F", str(nn.ssh_config), al, "--", "mkdir", "-p", "--", shlex.quote(wd[al])])
        assert r.returncode == 0, r.stderr
    preset = tiny_preset(tmp_path_factory.mktemp("p2") / "p.yaml", [S1, S2], micro=4, every=8,
                         cluster=cluster(nn, wd))
    t0 = time.time()
    res = cli(nn, ["--run", str(preset)], env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not pwned.exists()
    run_id = res.stdout.split()[1]
    _, run_dir = run_row(env["CPT_TUI_DB"], run_id)
    return Run(res, env, wd, run_id, run_dir, time.time() - t0, {})


def test_two_stage_run_without_shared_disk(two_stage, netns_private_nodes):
    nn, r = netns_private_nodes, two_stage
    con, run_dir = run_row(r.env["CPT_TUI_DB"], r.run_id)
    for stage, steps in (S1, S2):
        evs = node_events(nn, "node-a", r.wd["node-a"], run_dir, stage)
        want = [(e["seq"], e["step"], e["loss"]) for e in evs if e["type"] == "metric"]
        rows = [tuple(x) for x in con.execute("SELECT seq, step, loss FROM metrics WHERE run_id = ? AND stage = ? "
                                              "ORDER BY seq", [r.run_id, stage])]
        assert rows == want and [x[1] for x in rows] == list(range(1, steps + 1))
        local, _ = read_events(run_dir / "stages" / stage / "events.jsonl")
        assert local == evs  # the manager's copy is rank 0's, record for record
        assert (run_dir / "stages" / stage / "final" / "config.json").exists()
        assert not (run_dir / "stages" / stage / "checkpoints").exists()  # they stay on the nodes
    # every node has its own checkpoints (rank 1's files on node-b, with the replicated weights)
    ls = nn.ssh("node-b", f"ls -- {shlex.quote(r.wd['node-b'])}/runs/{run_dir.name}/stages/s1/checkpoints/step-24")
    for f in ("rng-rank1.pt", "trainer_state.json", "model.safetensors", "optimizer.pt"):
        assert f in ls.stdout, ls.stdout + ls.stderr
    pushes = [json.loads(d) for (d,) in con.execute(
        "SELECT data FROM events WHERE run_id = ? AND type = 'transfer' ORDER BY rowid", [r.run_id])]
    push = {(p["stage_name"], p["node"]): p for p in pushes if p["op"] == "push"}
    assert push[("s1", "node-a")]["bytes"] > 100_000 and push[("s1", "node-b")]["bytes"] > 100_000
    # stage 2: the shards and tokenizer are on the nodes already; only the stage JSON and (node-b) s1's final/
    final_size = sum(f.stat().st_size for f in (run_dir / "stages" / "s1" / "final").rglob("*") if f.is_file())
    assert push[("s2", "node-a")]["bytes"] < 20_000, push[("s2", "node-a")]
    assert push[("s2", "node-b")]["bytes"] < final_size + 20_000, push[("s2", "node-b")]
    assert push[("s2", "node-b")]["size"] >= push[("s1", "node-b")]["size"]  # the same shards, not re-sent
    for node in nn.nodes:  # each push's summary (bytes, seconds, bytes/s) is printed by `--run`
        assert any(ln.startswith(f"[@run] pushed ") and f"to {node} for s1" in ln and "/s)" in ln
                   for ln in r.res.stdout.splitlines()), r.res.stdout[-3000:]
    con.close()
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(run_dir / "stages" / "s2" / "final"))
    assert m.config.hidden_size == 32
    print(f"two-stage no-shared-disk run: {r.seconds:.1f} s; pushes: "
          + ", ".join(f"{k[0]}/{k[1]}={v['bytes']}B" for k, v in push.items()))


# --------------------------------------------------------------------------- the interrupted run


def _stream_clients() -> list[int]:
    return procs_matching(lambda _d, argv: argv[0] == b"ssh" and any(MARK.encode() in a and b"follow" in a for a in argv))


def _trainer(workdir_root: str, rank: int) -> list[int]:
    """The engine.train process of `rank` (its environment), started on the node whose workdir is given."""
    def match(d, argv):
        if b"engine.train" not in argv:
            return False
        try:
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{d}/cwd")
        except OSError:
            return False
        return f"RANK={rank}".encode() in env and cwd.startswith(workdir_root)
    return procs_matching(match)


@pytest.fixture(scope="module")
def interrupted(netns_private_nodes, tmp_path_factory, shared_cache) -> Run:
    nn = netns_private_nodes
    env = _home(tmp_path_factory, shared_cache, "noshare-cut")
    wd = {al: f"{nn.workdirs[al]}/cut" for al in nn.nodes}
    for al in nn.nodes:
        nn.ssh(al, f"mkdir -p {wd[al]}")
    preset = tiny_preset(tmp_path_factory.mktemp("p1") / "p.yaml", [S1], micro=4, every=8,
                         cluster=cluster(nn, wd, env={"CPT_FAULT_SLOW_S": "0.3"}, port=29531))
    t0 = time.time()
    p = subprocess.Popen([*nn.prefix, PY, "-m", "cpt_tui.cli", "--run", str(preset), "--restart-backoff", "1"],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    extra = {}
    try:
        home = Path(env["CPT_TUI_HOME"])
        ev = wait_for(lambda: next((f for f in home.glob("runs/*/stages/s1/events.jsonl")
                                    if f.stat().st_size > 2000), None), 300, "streamed events")
        pids = wait_for(_stream_clients, 30, "the event stream's ssh client")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # cut the stream mid-stage
        extra["cut_at"] = ev.stat().st_size
        # after the first checkpoint (step 8, on both nodes) and a few steps more: kill -9 rank 1 on node-b
        wait_for(lambda: b'"step": 10' in ev.read_bytes() or b'"step":10' in ev.read_bytes(), 300,
                 "step 10 streamed")
        victims = wait_for(lambda: _trainer(nn.workdirs["node-b"], 1), 30, "node-b's trainer")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        extra["killed"] = victims
        out, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    run_id = out.split()[1]
    _, run_dir = run_row(env["CPT_TUI_DB"], run_id)
    return Run(subprocess.CompletedProcess(p.args, p.returncode, out, err), env, wd, run_id, run_dir,
               time.time() - t0, extra)


def test_event_stream_cut_reconnects_exactly_once(interrupted, netns_private_nodes):
    nn, r = netns_private_nodes, interrupted
    con, run_dir = run_row(r.env["CPT_TUI_DB"], r.run_id)
    evs = node_events(nn, "node-a", r.wd["node-a"], run_dir, "s1")
    want = [(e["seq"], e["step"], e["loss"]) for e in evs if e["type"] == "metric"]
    rows = [tuple(x) for x in con.execute("SELECT seq, step, loss FROM metrics WHERE run_id = ? ORDER BY seq",
                                          [r.run_id])]
    assert rows == want  # every metric of both attempts, once
    seqs = [s for (s,) in con.execute("SELECT seq FROM events WHERE run_id = ? AND stage = 's1'", [r.run_id])]
    assert sorted(seqs) == [e["seq"] for e in evs]  # every event exactly once
    local, _ = read_events(run_dir / "stages" / "s1" / "events.jsonl")
    assert local == evs
    states = [e.get("state") for e in run_events(con, r.run_id)]
    assert "node_disconnected" in states and states.count("node_connected") >= 2, states
    assert r.extra["cut_at"] < (run_dir / "stages" / "s1" / "events.jsonl").stat().st_size
    con.close()


def test_kill9_of_a_node_trainer_resumes_from_its_checkpoint(interrupted, two_stage, netns_private_nodes):
    nn, r = netns_private_nodes, interrupted
    con, run_dir = run_row(r.env["CPT_TUI_DB"], r.run_id)
    restarts = [e for e in run_events(con, r.run_id) if e.get("state") == "restarting"]
    assert len(restarts) == 1, restarts
    evs = node_events(nn, "node-a", r.wd["node-a"], run_dir, "s1")
    running = [e for e in evs if e["type"] == "status" and e.get("state") == "running"]
    assert len(running) == 2 and running[0]["resumed_from"] is None
    resumed = running[1]["resumed_from"]  # a node path (relative to the workdir): the node's own checkpoint
    assert resumed.startswith(f"runs/{run_dir.name}/stages/s1/checkpoints/step-"), resumed
    step = int(resumed.rsplit("-", 1)[1])
    assert step >= 8 and running[1]["step"] == step
    assert not (run_dir / "stages" / "s1" / "checkpoints").exists()  # never on the manager
    # the redone steps were logged twice on the node; the reads show each step once (the latest attempt)
    steps = [e["step"] for e in evs if e["type"] == "metric"]
    assert len(steps) > S1[1] and sorted(set(steps)) == list(range(1, S1[1] + 1))
    got = losses(con, r.run_id, "s1")
    con.close()
    ref_con, _ = run_row(two_stage.env["CPT_TUI_DB"], two_stage.run_id)
    ref = losses(ref_con, two_stage.run_id, "s1")
    ref_con.close()
    assert sorted(got) == sorted(ref) == list(range(1, S1[1] + 1))
    after = [s for s in got if s > step]
    assert after and [got[s] for s in after] == [ref[s] for s in after], (got, ref)  # exactly, fp32
    assert got == ref  # and before the resume too (the same run up to the kill)
    print(f"interrupted run: {r.seconds:.1f} s; resumed from step {step}; killed {r.extra['killed']}")


# --------------------------------------------------------------------------- preflight, plan


def test_node_without_enough_disk_exit_2_at_preflight(netns_private_nodes, cpt_home, tmp_path):
    nn = netns_private_nodes
    wd = {"node-a": f"{nn.workdirs['node-a']}/disk", "node-b": nn.small["node-b"]}
    nn.ssh("node-a", f"mkdir -p {wd['node-a']}")
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 8)], micro=4, cluster=cluster(nn, wd, port=29532))
    t0 = time.time()
    res = cli(nn, ["--run", str(preset)], cpt_home, timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.stderr
    assert "node node-b: not enough disk in workdir" in err and "short by" in err, err
    assert "the run needs at least" in err and "bytes free" in err, err
    assert "node node-a" not in err
    # refused before anything ran: no run recorded, nothing prepared
    home = Path(cpt_home["CPT_TUI_HOME"])
    assert not list(home.glob("runs/*")), list(home.glob("runs/*"))
    print(f"disk refusal in {time.time() - t0:.1f} s: {err.strip().splitlines()[-1]}")


def test_plan_commands_show_push_stream_pull(netns_private_nodes, cpt_home, tmp_path):
    nn = netns_private_nodes
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 8)], micro=4, cluster=cluster(nn, nn.workdirs))
    r = subprocess.run([PY, "-m", "cpt_tui.cli", "plan", str(preset), "--commands"], env=cpt_home, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "shared_fs: false" in out and out.count("rsync -L") == 2 and "<stream-reader>" in out
    assert "pull final/" in out and "--protect-args" in out


# --------------------------------------------------------------------------- the UI (no hosts needed)


def test_run_detail_shows_a_node_disconnected_while_its_stream_is_down(tmp_path):
    """The run detail's title names a node whose last connection event is node_disconnected (what the
    ssh backend records while the event stream is down), until its node_connected."""
    import asyncio

    from cpt_tui.store import Store
    from cpt_tui.ui import sample_db
    from cpt_tui.ui.app import CptApp
    from tests.pilot import until

    db = tmp_path / "cpt-tui.db"
    sample_db.build(db)
    with Store(db) as s:
        s.add_event(sample_db.LIVE, "@run", "status", state="node_connected", node="gpu-01", offset=0)
        s.add_event(sample_db.LIVE, "@run", "status", state="node_disconnected", node="gpu-01", offset=4096,
                    reason="event stream's ssh channel closed (exit 255)")

    def title(app) -> str:
        return str(app.screen.query_one("#run-title").render())

    async def go():
        app = CptApp(db, keymap={})
        async with app.run_test(size=(160, 40)) as pilot:
            await until(pilot, lambda: type(app.screen).__name__ == "RunsScreen")
            app.open_run(sample_db.LIVE)
            await until(pilot, lambda: type(app.screen).__name__ == "RunDetailScreen" and app.screen.data)
            assert "node gpu-01: disconnected since" in title(app), title(app)
            with Store(db) as s:
                s.add_event(sample_db.LIVE, "@run", "status", state="node_connected", node="gpu-01", offset=4096)
            await until(pilot, lambda: "disconnected" not in title(app), 15)
    asyncio.run(go())


_CATCH_UP = """
import json, sys
sys.path.insert(0, {root!r})
from cpt_tui.backends import backend_for
from engine.layout import RunLayout
from engine.spec import load_preset
preset = load_preset({preset!r})
sl = RunLayout({run_dir!r}).stage("s1")
backend = backend_for(preset.cluster)
notes = []
backend.notify = lambda type, **data: notes.append(data.get("state"))
backend.catch_up_events(sl)
print(json.dumps(notes))
"""


def test_a_new_attempt_first_fetches_what_the_previous_one_wrote(netns_private_nodes, cpt_home, tmp_path):
    """Before relaunching a stage after its supervisor died, the backend fetches the rest of rank 0's
    events.jsonl that the dead supervisor's stream had not copied (the supervisor then ingests it as the
    previous attempt's): the manager's copy becomes the node's complete lines, a torn tail excluded."""
    nn = netns_private_nodes
    wd = {al: f"{nn.workdirs[al]}/catchup" for al in nn.nodes}
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 8)], cluster=cluster(nn, wd))
    run_dir = tmp_path / "runs" / "r-catchup"
    local = run_dir / "stages" / "s1" / "events.jsonl"
    local.parent.mkdir(parents=True)
    lines = [json.dumps({"v": 1, "seq": i, "ts": 1.0, "type": "metric", "stage": "s1", "step": i}) + "\n"
             for i in range(1, 41)]
    node_file = f"{wd['node-a']}/runs/r-catchup/stages/s1/events.jsonl"
    text = "".join(lines) + '{"v": 1, "seq": 41, "ty'  # the trainer was killed mid-write
    r = nn.ssh("node-a", f"mkdir -p -- {shlex.quote(str(Path(node_file).parent))} && "
                         f"printf %s {shlex.quote(text)} > {shlex.quote(node_file)}")
    assert r.returncode == 0, r.stderr
    local.write_text("".join(lines[:12]) + lines[12][:17])  # copied up to the middle of line 13
    r = nn.run([PY, "-c", _CATCH_UP.format(root=str(ROOT), preset=str(preset), run_dir=str(run_dir))], timeout=120)
    assert r.returncode == 0, r.stderr
    assert local.read_text() == "".join(lines)
    assert "node_disconnected" not in json.loads(r.stdout.splitlines()[-1])


def test_supervisor_death_the_old_attempts_last_events_stay_its_own(netns_private_nodes, cpt_home, tmp_path):
    """kill -9 of the supervisor of a run without a shared disk: the node's guard ends the trainer, which
    logs its last step and checkpoints after the stream is gone; the new supervisor (`cpt-tui runs`)
    fetches those events before relaunching, so every metric row up to that checkpoint is attempt 1's
    and the relaunch's rows start right after it."""
    from cpt_tui.procs import proc_alive
    from tests.test_supervisor import events as db_events, run_row as db_run, wait_done

    nn, env, steps = netns_private_nodes, cpt_home, 40
    wd = {al: f"{nn.workdirs[al]}/sup-death" for al in nn.nodes}
    for al in nn.nodes:
        assert nn.ssh(al, f"mkdir -p -- {shlex.quote(wd[al])}").returncode == 0
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", steps)], micro=4, every=5,
                         cluster=cluster(nn, wd, port=29534, env={"CPT_FAULT_SLOW_S": "0.25"}))
    r = cli(nn, ["--run", str(preset), "--detach", "--telemetry-interval", "0"], env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = r.stdout.strip()
    wait_for(lambda: db_events(env, run_id, "s1", "checkpoint"), 240, "a first checkpoint (ingested)")
    sup = db_run(env, run_id)["pid"]
    os.kill(sup, signal.SIGKILL)
    wait_for(lambda: not proc_alive(sup), 10, "the supervisor to die")
    r = cli(nn, ["runs"], env, timeout=120)
    assert r.returncode == 0 and run_id in r.stdout, r.stdout + r.stderr
    row = wait_done(env, run_id, 300)
    run_dir = Path(row["run_dir"])
    assert row["status"] == "done", (row["error"], (run_dir / "stages" / "s1" / "train.log").read_text()[-3000:])

    evs = node_events(nn, "node-a", wd["node-a"], run_dir, "s1")
    (stopped,) = [e for e in evs if e["type"] == "status" and e["state"] == "stopped"]
    k = stopped["step"]
    con = sqlite3.connect(env["CPT_TUI_DB"])
    rows = con.execute("SELECT step, attempt FROM metrics WHERE run_id = ? AND stage = 's1' ORDER BY seq",
                       [run_id]).fetchall()
    assert rows == [(s, 1) for s in range(1, k + 1)] + [(s, 2) for s in range(k + 1, steps + 1)], (k, rows)
    # the manager's copy is the node's file, byte for byte
    local = (run_dir / "stages" / "s1" / "events.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in local] == evs
