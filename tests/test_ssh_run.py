"""Whole runs through the SSH launcher, via the CLI: real sshd on loopback, real network namespaces.

- preflight at `--run`: an unreachable node, or a node without the engine → exit 2 naming the node,
  nothing recorded;
- a node workdir `/tmp/a b; touch /tmp/pwned_…` (and env values with shell syntax): the run completes in
  that directory and nothing is executed; secrets from the environment reach neither SQLite nor logs;
  telemetry comes back from the node over ssh;
- a real 2-node × 1-process gloo run in two network namespaces completes and its metrics are in SQLite.

The nodes share this filesystem, so the run directory is shared (a requirement, see README).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

from engine.events import read_events
from tests.demo_run import ROOT, run_cli, tiny_preset
from tests.hosts import free_port

PY = sys.executable


def node(host, workdir=str(ROOT), **kw) -> dict:
    d = {"host": host, "workdir": workdir, "python": PY, "env": {"PYTHONPATH": str(ROOT)}}
    d.update(kw)
    return d


def ssh_cluster(cfg, nodes, **kw) -> dict:
    return {"kind": "ssh", "processes_per_node": 1, "ssh_options": ["-F", str(cfg)], "nodes": nodes, **kw}


def test_unreachable_node_exit_2_names_it(sshd_loopback, cpt_home, tmp_path):
    port = free_port()  # nothing listens there
    cl = ssh_cluster(sshd_loopback.ssh_config, [node("node-a"), node("127.0.0.1", port=port)])
    preset = tiny_preset(tmp_path / "p.yaml", cluster=cl, micro=4)
    for args in (["--run", str(preset)], ["--run", str(preset), "--detach"]):
        r = run_cli(args, cpt_home, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "node 127.0.0.1: unreachable over ssh" in r.stderr and "refused" in r.stderr.lower()
        assert "node node-a" not in r.stderr
    assert not Path(cpt_home["CPT_TUI_HOME"], "runs").exists()  # nothing was started


def test_node_missing_the_engine_is_a_clear_error(sshd_loopback, cpt_home, tmp_path):
    # A real python without the engine: a bare venv (the project's own venv may have it installed editable).
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    bare_py = str(bare / "bin" / "python")
    cl = ssh_cluster(sshd_loopback.ssh_config, [node("node-b", workdir=str(tmp_path), env={}, python=bare_py)])
    preset = tiny_preset(tmp_path / "p.yaml", cluster=cl)
    env = {k: v for k, v in cpt_home.items() if k != "PYTHONPATH"}  # PYTHONPATH would reach the node
    r = run_cli(["--run", str(preset), "--detach"], env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"node node-b: the engine is not installed for {bare_py}" in r.stderr and "pip install" in r.stderr
    assert not Path(cpt_home["CPT_TUI_HOME"], "runs").exists()  # nothing was started


def test_ssh_run_with_hostile_workdir_no_injection_no_secret_leak(sshd_loopback, cpt_home, tmp_path):
    uniq = uuid.uuid4().hex[:10]
    pwned = Path(f"/tmp/pwned_{uniq}")
    workdir = Path(f"/tmp/a b; touch {pwned}")
    workdir.mkdir(parents=True)
    secret, local_secret = f"hf_sekret_{uniq}", f"local_pw_{uniq}"
    env = {**cpt_home, "WANDB_API_KEY": local_secret}
    # Every Python process on the node records, as it exits, its argv and working directory
    # (a sitecustomize on the node's PYTHONPATH: no hook in the engine needed).
    probe, cwd_log = tmp_path / "probe", tmp_path / "cwd.log"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        "import atexit, json, os, sys\n"
        "def _record(log=os.environ.get('CPT_TEST_CWD_LOG')):\n"
        "    if log:\n"
        "        with open(log, 'a') as f:\n"
        "            f.write(json.dumps({'argv': sys.argv, 'cwd': os.getcwd(), 'pid': os.getpid()}) + '\\n')\n"
        "atexit.register(_record)\n")
    try:
        cl = ssh_cluster(sshd_loopback.ssh_config,
                         [node("node-a", workdir=str(workdir),
                               env={"PYTHONPATH": f"{probe}:{ROOT}", "CPT_TEST_CWD_LOG": str(cwd_log),
                                    "EVIL": f"$(touch {pwned})`touch {pwned}`"})],
                         env={"HF_TOKEN": secret})
        preset = tiny_preset(tmp_path / "p.yaml", [("s1", 30)], cluster=cl)
        r = run_cli(["--run", str(preset), "--telemetry-interval", "1"], env, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert not pwned.exists()
        run_id = r.stdout.split()[1]
        con = sqlite3.connect(cpt_home["CPT_TUI_DB"])
        run_dir = Path(con.execute("SELECT run_dir FROM runs WHERE id = ?", [run_id]).fetchone()[0])
        assert con.execute("SELECT COUNT(*) FROM metrics WHERE run_id = ?", [run_id]).fetchone()[0] == 30
        # the trainer really ran on the node, in that directory
        (start,) = [json.loads(d) for (d,) in con.execute(
            "SELECT data FROM events WHERE run_id = ? AND stage = 's1' AND type = 'status' AND data LIKE "
            "'%starting%'", [run_id])]
        assert start["world_size"] == 1
        seen = [json.loads(l) for l in cwd_log.read_text().splitlines()]
        trainers = [x for x in seen if x["argv"] and x["argv"][0].endswith(os.path.join("engine", "train.py"))]
        assert trainers and all(x["cwd"] == str(workdir) for x in trainers), seen  # the trainer ran in that dir
        nodes = {n for (n,) in con.execute("SELECT DISTINCT node FROM telemetry WHERE run_id = ?", [run_id])}
        assert nodes == {"node-a"}  # sampled on the node, over ssh
        (commands,) = [json.loads(d)["commands"] for (d,) in con.execute(
            "SELECT data FROM events WHERE run_id = ? AND data LIKE '%stage_started%'", [run_id])]
        assert "HF_TOKEN='***'" in commands and "ssh -F" in commands
        con.close()
        # no secret in SQLite (database and WAL) or in any log
        stores = [Path(cpt_home["CPT_TUI_DB"] + sfx) for sfx in ("", "-wal")]
        logs = list(run_dir.rglob("*.log"))
        assert logs and any(p.name == "supervisor.log" for p in logs)
        for p in stores + logs:
            if p.exists():
                data = p.read_bytes()
                assert secret.encode() not in data and local_secret.encode() not in data, p
    finally:
        if pwned.exists():
            pwned.unlink()
        shutil.rmtree(workdir, ignore_errors=True)
        for parent in (workdir.parent, workdir.parent.parent):  # "/tmp/a b; touch " / "tmp": only if empty
            try:
                parent.rmdir()
            except OSError:
                pass


def test_two_node_gloo_training_run_in_network_namespaces(netns_nodes, cpt_home, tmp_path):
    nn = netns_nodes
    nodes = [node(al, address=nn.addresses[al], env={"PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": nn.ifnames[al]})
             for al in nn.nodes]
    preset = tiny_preset(tmp_path / "p.yaml", [("s1", 30)], micro=4,
                         cluster=ssh_cluster(nn.ssh_config, nodes, main_process_port=29510))
    # The manager (CLI, supervisor, ssh clients) runs in the first namespace, where the nodes are reachable.
    res = subprocess.run([*nn.prefix, PY, "-m", "cpt_tui.cli", "--run", str(preset), "--telemetry-interval", "1"],
                         env=cpt_home, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_id = res.stdout.split()[1]
    con = sqlite3.connect(cpt_home["CPT_TUI_DB"])
    run_dir = Path(con.execute("SELECT run_dir FROM runs WHERE id = ?", [run_id]).fetchone()[0])
    evs, _ = read_events(run_dir / "stages" / "s1" / "events.jsonl")
    want = [(e["seq"], e["step"], e["loss"]) for e in evs if e["type"] == "metric"]
    rows = [tuple(r) for r in con.execute("SELECT seq, step, loss FROM metrics WHERE run_id = ? ORDER BY seq", [run_id])]
    assert rows == want and [r[1] for r in rows] == list(range(1, 31))
    (start,) = [e for e in evs if e["type"] == "status" and e["state"] == "starting"]
    assert start["world_size"] == 2  # two ranks, one per node, over gloo
    (commands,) = [json.loads(d)["commands"] for (d,) in con.execute(
        "SELECT data FROM events WHERE run_id = ? AND data LIKE '%stage_started%'", [run_id])]
    assert "--num_machines 2" in commands and "--machine_rank 1" in commands
    assert f"--main_process_ip {nn.addresses['node-a']}" in commands
    nodes = {n for (n,) in con.execute("SELECT DISTINCT node FROM telemetry WHERE run_id = ?", [run_id])}
    assert nodes == {"node-a", "node-b"}
