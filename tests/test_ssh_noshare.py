"""`cluster.shared_fs: false`: nodes with private disks (tests/hosts.py `netns_private_nodes`: two
network namespaces, each sshd in its own mount namespace with a tmpfs workdir the manager cannot see).

- a 2-stage run over 2 nodes × 1 process, node workdirs with spaces and shell syntax: completes;
  SQLite's metrics are exactly rank 0's events on the node; each stage's final/ is here and loads;
  the second stage re-sent none of the shards (rsync's literal bytes);
- the event stream's ssh client killed mid-stage: it reconnects, every event arrives exactly once;
- a node whose workdir is too small: the run fails before training, naming the node and the bytes;
- `plan --commands` lists the push / stream / pull commands.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from engine.events import read_events
from tests.demo_run import ROOT, tiny_preset, wait_for
from tests.hosts import netns_private_nodes  # noqa: F401  (fixture)

PY = sys.executable
MARK = "cpt-stream"


def cluster(nn, workdirs, **kw) -> dict:
    nodes = [{"host": al, "workdir": workdirs[al], "python": PY, "address": nn.addresses[al],
              "env": {"PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": nn.ifnames[al], **kw.pop("env", {})}}
             for al in nn.nodes]
    return {"kind": "ssh", "processes_per_node": 1, "ssh_options": ["-F", str(nn.ssh_config)], "nodes": nodes,
            "shared_fs": False, "main_process_port": kw.pop("port", 29530), **kw}


def cli(nn, args, env, **kw):
    return subprocess.run([*nn.prefix, PY, "-m", "cpt_tui.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, **kw)


def node_events(nn, alias, workdir, run_dir, stage) -> list[dict]:
    path = f"{workdir}/runs/{Path(run_dir).name}/stages/{stage}/events.jsonl"
    r = nn.ssh(alias, f"cat -- '{path}'" if "'" not in path else "false")
    assert r.returncode == 0, r.stderr
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]


def run_row(db, run_id):
    con = sqlite3.connect(db)
    return con, Path(con.execute("SELECT run_dir FROM runs WHERE id = ?", [run_id]).fetchone()[0])


def test_two_stage_run_without_shared_disk(netns_private_nodes, cpt_home, tmp_path):
    nn = netns_private_nodes
    uniq = uuid.uuid4().hex[:8]
    pwned = Path(f"/tmp/pwned_{uniq}")
    wd = {al: f"{nn.workdirs[al]}/a b; touch {pwned} $(touch {pwned})" for al in nn.nodes}
    for al in nn.nodes:  # create the workdirs literally on the nodes
        r = nn.run(["ssh", "-F", str(nn.ssh_config), al, "--", "mkdir", "-p", "--", _sq(wd[al])])
        assert r.returncode == 0, r.stderr
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 24), ("s2", 16)], micro=4, every=8,
                         cluster=cluster(nn, wd))
    t0 = time.time()
    res = cli(nn, ["--run", str(preset)], cpt_home, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not pwned.exists()
    run_id = res.stdout.split()[1]
    con, run_dir = run_row(cpt_home["CPT_TUI_DB"], run_id)
    for stage, steps in (("s1", 24), ("s2", 16)):
        evs = node_events(nn, "node-a", wd["node-a"], run_dir, stage)
        want = [(e["seq"], e["step"], e["loss"]) for e in evs if e["type"] == "metric"]
        rows = [tuple(r) for r in con.execute("SELECT seq, step, loss FROM metrics WHERE run_id = ? AND stage = ? "
                                              "ORDER BY seq", [run_id, stage])]
        assert rows == want and [r[1] for r in rows] == list(range(1, steps + 1))
        local, _ = read_events(run_dir / "stages" / stage / "events.jsonl")
        assert local == evs  # the manager's copy is byte-for-byte rank 0's
        assert (run_dir / "stages" / stage / "final" / "config.json").exists()
        assert not (run_dir / "stages" / stage / "checkpoints").exists()  # they stay on the nodes
    # every node has its own checkpoints (rank 1's files on node-b)
    r = nn.ssh("node-b", f"ls -- {_sq(wd['node-b'])}/runs/{run_dir.name}/stages/s1/checkpoints/step-24")
    assert "rng-rank1.pt" in r.stdout and "trainer_state.json" in r.stdout, r.stdout + r.stderr
    pushes = [json.loads(d) for (d,) in con.execute(
        "SELECT data FROM events WHERE run_id = ? AND type = 'transfer' ORDER BY rowid", [run_id])]
    push = {(p["stage_name"], p["node"]): p for p in pushes if p["op"] == "push"}
    assert push[("s1", "node-a")]["bytes"] > 100_000 and push[("s1", "node-b")]["bytes"] > 100_000
    # stage 2: the shards and tokenizer are on the nodes already; only the stage JSON and (node-b) s1's final/
    final_size = sum(f.stat().st_size for f in (run_dir / "stages" / "s1" / "final").rglob("*") if f.is_file())
    assert push[("s2", "node-a")]["bytes"] < 20_000, push[("s2", "node-a")]
    assert push[("s2", "node-b")]["bytes"] < final_size + 20_000, push[("s2", "node-b")]
    assert push[("s2", "node-b")]["size"] >= push[("s1", "node-b")]["size"]  # the same shards, not re-sent
    con.close()
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(run_dir / "stages" / "s2" / "final"))
    assert m.config.hidden_size == 32
    print(f"two-stage no-shared-disk run: {time.time() - t0:.1f} s; pushes: "
          + ", ".join(f"{k[0]}/{k[1]}={v['bytes']}B" for k, v in push.items()))


def _sq(s: str) -> str:
    import shlex
    return shlex.quote(s)


def _stream_clients() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0] == b"ssh" and any(MARK.encode() in a and b"follow" in a for a in argv):
            out.append(int(d))
    return out


def test_event_stream_cut_reconnects_exactly_once(netns_private_nodes, cpt_home, tmp_path):
    nn = netns_private_nodes
    wd = {al: f"{nn.workdirs[al]}/cut" for al in nn.nodes}
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 40)], micro=4, every=20,
                         cluster=cluster(nn, wd, env={"CPT_FAULT_SLOW_S": "0.25"}, port=29531))
    for al in nn.nodes:
        nn.ssh(al, f"mkdir -p {wd[al]}")
    p = subprocess.Popen([*nn.prefix, PY, "-m", "cpt_tui.cli", "--run", str(preset)], env=cpt_home, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        home = Path(cpt_home["CPT_TUI_HOME"])
        ev = wait_for(lambda: next((f for f in home.glob("runs/*/stages/s1/events.jsonl")
                                    if f.stat().st_size > 2000), None), 300, "streamed events")
        pids = wait_for(_stream_clients, 30, "the event stream's ssh client")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # cut the stream mid-stage
        cut_at = ev.stat().st_size
        out, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    run_id = out.split()[1]
    con, run_dir = run_row(cpt_home["CPT_TUI_DB"], run_id)
    evs = node_events(nn, "node-a", wd["node-a"], run_dir, "s1")
    want = [(e["seq"], e["step"], e["loss"]) for e in evs if e["type"] == "metric"]
    rows = [tuple(r) for r in con.execute("SELECT seq, step, loss FROM metrics WHERE run_id = ? ORDER BY seq",
                                          [run_id])]
    assert rows == want and [r[1] for r in rows] == list(range(1, 41))
    seqs = [s for (s,) in con.execute("SELECT seq FROM events WHERE run_id = ? AND stage = 's1'", [run_id])]
    assert sorted(seqs) == [e["seq"] for e in evs]  # every event exactly once
    states = [json.loads(d).get("state") for (d,) in con.execute(
        "SELECT data FROM events WHERE run_id = ? AND stage = '@run' ORDER BY rowid", [run_id])]
    assert "node_disconnected" in states and states.count("node_connected") >= 2, states
    assert cut_at < (run_dir / "stages" / "s1" / "events.jsonl").stat().st_size
    con.close()


def test_node_without_enough_disk_names_it_and_the_bytes(netns_private_nodes, cpt_home, tmp_path):
    nn = netns_private_nodes
    wd = {"node-a": f"{nn.workdirs['node-a']}/disk", "node-b": nn.small["node-b"]}
    nn.ssh("node-a", f"mkdir -p {wd['node-a']}")
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 8)], micro=4, cluster=cluster(nn, wd, port=29532))
    res = cli(nn, ["--run", str(preset)], cpt_home, timeout=600)
    assert res.returncode != 0
    err = res.stderr
    assert "node node-b: not enough disk in workdir" in err and "bytes to push" in err and "short by" in err, err
    assert "node node-a" not in err


def test_plan_commands_show_push_stream_pull(netns_private_nodes, cpt_home, tmp_path):
    nn = netns_private_nodes
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 8)], micro=4, cluster=cluster(nn, nn.workdirs))
    r = subprocess.run([PY, "-m", "cpt_tui.cli", "plan", str(preset), "--commands"], env=cpt_home, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "shared_fs: false" in out and out.count("rsync -L") == 2 and "<stream-reader>" in out
    assert "pull final/" in out and "--protect-args" in out
