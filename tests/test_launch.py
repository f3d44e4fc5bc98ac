"""cpt_tui.backends and cpt_tui.procs: argv structure, DeepSpeed config, redaction; then real runs through a real sshd on
loopback (quoting/injection, preflight, no orphans) and a real 2-node gloo run in network namespaces."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from cpt_tui import procs as L
from cpt_tui.backends import (LaunchError, NodeCommand, build_commands, build_telemetry_commands, format_commands,
                              preflight)
from cpt_tui.backends.accelerate import deepspeed_config, guard_grace
from cpt_tui.backends.shell import remote_script as _remote_script
from cpt_tui.procs import start, terminate
from cpt_tui.redact import redact
from engine.spec import ClusterSpec, NodeSpec, StageSpec
from tests.hosts import free_port, require

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
LAUNCH = [PY, "-m", "accelerate.commands.launch"]


def stage(**kw) -> StageSpec:
    base = dict(name="s1", mixture="m", seq_len=64, micro_batch_size=2, global_batch_size=8, precision="bf16")
    base.update(kw)
    return StageSpec(**base)


def flag(argv: list[str], name: str):
    return argv[argv.index(name) + 1]


def remote_words(cmd: NodeCommand) -> list[str]:
    """The remote command string parsed back the way a POSIX shell splits it."""
    assert cmd.argv[-2] == "--"
    return shlex.split(cmd.argv[-1])


# --------------------------------------------------------------------------- argv structure


def test_local_single_process():
    (c,) = build_commands(ClusterSpec(main_process_port=29500), stage(), "run/stage.json", "run", python=PY, cpu=True)
    assert (c.node, c.remote, c.rank) == ("local", False, 0)
    assert c.launch == [*LAUNCH, "--num_processes", "1", "--num_machines", "1", "--machine_rank", "0",
                        "--main_process_port", "29500", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                        "--cpu", "-m", "engine.train", "run/stage.json"]
    # the guard wraps it: python -c <guard> <grace> <launch...>
    assert c.argv[:2] == [PY, "-c"] and c.argv[2] == L._GUARD and c.argv[4:] == c.launch
    assert float(c.argv[3]) == guard_grace(300) == 315  # after torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    assert c.env == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}
    assert "--multi_gpu" not in c.argv and "--use_deepspeed" not in c.argv
    assert all(isinstance(a, str) for a in c.argv)


def test_local_single_process_gpu_and_fp32():
    (c,) = build_commands(ClusterSpec(), stage(precision="fp32"), "s.json", "run", cpu=False, module="tests.dist_probe")
    assert "--cpu" not in c.launch and "--multi_gpu" not in c.launch
    assert flag(c.launch, "--mixed_precision") == "no"
    assert c.launch[-3:] == ["-m", "tests.dist_probe", "s.json"]
    (c,) = build_commands(ClusterSpec(), stage(precision="fp16"), "s.json", "run", cpu=False)
    assert flag(c.launch, "--mixed_precision") == "fp16"


def test_local_two_processes():
    cl = ClusterSpec(processes_per_node=2, env={"FOO": "bar"})
    (c,) = build_commands(cl, stage(), "s.json", "run", python=PY, cpu=True)
    assert flag(c.launch, "--num_processes") == "2" and flag(c.launch, "--num_machines") == "1"
    assert "--multi_gpu" in c.launch and "--cpu" not in c.launch
    assert "--main_process_ip" not in c.launch
    assert c.env == {"FOO": "bar", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}


def two_node_cluster(**kw) -> ClusterSpec:
    nodes = [NodeSpec(host="gpu-a", address="10.1.0.1", env={"GLOO_SOCKET_IFNAME": "eth1"}),
             NodeSpec(host="gpu-b", user="bob", port=2200, python="/opt/py/bin/python", workdir="/srv/cpt")]
    base = dict(kind="ssh", processes_per_node=4, nodes=nodes, main_process_port=29555, env={"A": "1"},
                ssh_options=["-o", "Compression=no"])
    base.update(kw)
    return ClusterSpec(**base)


def test_ssh_two_nodes():
    cmds = build_commands(two_node_cluster(), stage(global_batch_size=16, micro_batch_size=2), "r/stage.json", "r",
                          cpu=False, ssh_config="/cfg/ssh_config", local_env={})
    assert [c.node for c in cmds] == ["gpu-a", "gpu-b"] and [c.rank for c in cmds] == [0, 1]
    for rank, c in enumerate(cmds):
        assert c.remote
        assert c.argv[0] == "ssh" and c.argv[1:3] == ["-F", "/cfg/ssh_config"]
        assert c.argv[3:5] == ["-o", "Compression=no"]  # cluster.ssh_options, before ours
        assert "BatchMode=yes" in c.argv and "-T" in c.argv
        a = c.launch
        assert flag(a, "--num_processes") == "8" and flag(a, "--num_machines") == "2"
        assert flag(a, "--machine_rank") == str(rank)
        assert flag(a, "--main_process_ip") == "10.1.0.1" and flag(a, "--main_process_port") == "29555"
        assert "--multi_gpu" in a and a[-3:] == ["-m", "engine.train", "r/stage.json"]
    a, b = cmds
    assert a.argv[-3] == "gpu-a" and "-p" not in a.argv
    assert b.argv[b.argv.index("-p") + 1] == "2200" and b.argv[-3] == "bob@gpu-b"
    wa, wb = remote_words(a), remote_words(b)
    assert wa[:3] == ["cd", "--", "$HOME/cpt-tui"]  # the default ~/cpt-tui, expanded by the remote shell
    assert wb[:4] == ["cd", "--", "/srv/cpt", "&&"] and wb[4:6] == ["exec", "env"]
    # env: cluster.env then node.env; then the guard; then the launch argv, word for word
    i = wb.index("/opt/py/bin/python")
    assert wb[6:i] == ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300", "A=1"]
    assert wb[i:i + 4] == ["/opt/py/bin/python", "-c", L._GUARD, "315"]
    assert wb[i + 4:] == b.launch
    assert wa[wa.index("env") + 1:wa.index("python3")] == ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300", "A=1",
                                                           "GLOO_SOCKET_IFNAME=eth1"]
    assert a.env == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300", "A": "1", "GLOO_SOCKET_IFNAME": "eth1"}


def test_ssh_main_ip_needs_an_address_and_unequal_processes():
    # issue 20 (7): an ssh alias as the main process address may not resolve on the other nodes
    cl = ClusterSpec(kind="ssh", processes_per_node=1, nodes=[NodeSpec(host="h0"), NodeSpec(host="h1")])
    with pytest.raises(LaunchError, match="node h0: set its `address`"):
        build_commands(cl, stage(), "s.json", "r", local_env={})
    cl = ClusterSpec(kind="ssh", processes_per_node=1, nodes=[NodeSpec(host="10.0.0.5"), NodeSpec(host="h1")])
    cmds = build_commands(cl, stage(), "s.json", "r", local_env={})
    assert {flag(c.launch, "--main_process_ip") for c in cmds} == {"10.0.0.5"}
    assert "--multi_gpu" in cmds[0].launch  # 2 machines × 1 process = 2 processes
    (c,) = build_commands(ClusterSpec(kind="ssh", processes_per_node=1, nodes=[NodeSpec(host="h0")]), stage(),
                          "s.json", "r", local_env={})  # one machine: no address needed
    assert flag(c.launch, "--main_process_ip") == "h0"
    cl = ClusterSpec(kind="ssh", nodes=[NodeSpec(host="h0", processes=2), NodeSpec(host="h1", processes=1)])
    with pytest.raises(LaunchError, match="same number of processes"):
        build_commands(cl, stage(), "s.json", "r", local_env={})


def test_env_propagation_and_precedence():
    local = {"NCCL_DEBUG": "INFO", "GLOO_SOCKET_IFNAME": "lo", "HF_HOME": "/hf", "CUDA_VISIBLE_DEVICES": "0,1",
             "TORCH_HOME": "/th", "MASTER_ADDR": "m", "PYTHONPATH": "/pp", "PATH": "/usr/bin", "HOME": "/root",
             "HF_TOKEN": "hf_secret", "TORCHELASTIC_RUN_ID": "x", "LD_PRELOAD": "evil.so",
             "NCCL_SOCKET_IFNAME": "eth9", "FI_PROVIDER": "efa", "UCX_TLS": "rc", "LD_LIBRARY_PATH": "/mgr/lib"}
    cl = ClusterSpec(kind="ssh", processes_per_node=1, env={"NCCL_DEBUG": "WARN", "X": "c"},
                     nodes=[NodeSpec(host="h0", env={"X": "n", "GLOO_SOCKET_IFNAME": "v1"})])
    (c,) = build_commands(cl, stage(), "s.json", "r", local_env=local)
    # issue 20 (7): the manager's device / interface names and library paths are not the nodes'
    assert c.env == {"NCCL_DEBUG": "WARN", "GLOO_SOCKET_IFNAME": "v1", "HF_HOME": "/hf", "TORCH_HOME": "/th",
                     "PYTHONPATH": "/pp", "X": "n", "FI_PROVIDER": "efa", "UCX_TLS": "rc",
                     "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}
    assert "hf_secret" not in c.argv[-1] and "evil.so" not in c.argv[-1]


def test_bad_env_names_and_hosts_rejected():
    cl = ClusterSpec(kind="ssh", processes_per_node=1, nodes=[NodeSpec(host="h0", env={"A;touch x": "1"})])
    with pytest.raises(LaunchError, match="not valid"):
        build_commands(cl, stage(), "s.json", "r", local_env={})
    cl = ClusterSpec(kind="ssh", processes_per_node=1, nodes=[NodeSpec(host="-oProxyCommand=touch x")])
    with pytest.raises(LaunchError, match="invalid ssh host"):
        build_commands(cl, stage(), "s.json", "r", local_env={})


# --------------------------------------------------------------------------- deepspeed


def test_deepspeed_config_numbers():
    st = stage(micro_batch_size=2, global_batch_size=32, zero_stage=2, precision="bf16",
               optimizer={"grad_clip": 0.5})
    cfg = deepspeed_config(st, 4)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 32 == 2 * 4 * 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in cfg["zero_optimization"]
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"]["enabled"] is False

    cfg = deepspeed_config(stage(micro_batch_size=1, global_batch_size=6, zero_stage=3, offload="cpu",
                                 precision="fp16", optimizer={"grad_clip": None}), 3, cpu=True)
    z = cfg["zero_optimization"]
    assert (cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (2, 6)
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["offload_optimizer"]["pin_memory"] is False  # no pinned memory without CUDA
    assert cfg["fp16"]["enabled"] is True and cfg["bf16"]["enabled"] is False
    assert cfg["gradient_clipping"] == 0.0

    cfg = deepspeed_config(stage(zero_stage=1, offload="cpu", precision="fp32"), 1)
    assert "offload_param" not in cfg["zero_optimization"] and cfg["zero_optimization"]["offload_optimizer"]
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]

    with pytest.raises(LaunchError, match="not a multiple"):
        deepspeed_config(stage(micro_batch_size=2, global_batch_size=8, zero_stage=1), 3)


def test_deepspeed_in_commands(tmp_path):
    st = stage(micro_batch_size=1, global_batch_size=8, zero_stage=2, precision="bf16")
    cmds = build_commands(two_node_cluster(processes_per_node=2), st, "s.json", str(tmp_path), local_env={}, cpu=False)
    for c in cmds:
        a = c.launch
        assert "--use_deepspeed" in a and "--multi_gpu" not in a and "--cpu" not in a
        assert flag(a, "--deepspeed_multinode_launcher") == "standard"
        path = flag(a, "--deepspeed_config_file")
        cfg = json.loads(Path(path).read_text())
        assert cfg == deepspeed_config(st, 4)
        assert cfg["train_batch_size"] == 8 and cfg["gradient_accumulation_steps"] == 2
    (c,) = build_commands(ClusterSpec(), st, "s.json", str(tmp_path), cpu=True)
    assert "--use_deepspeed" in c.launch and "--cpu" not in c.launch  # --cpu would disable DeepSpeed
    assert "--deepspeed_multinode_launcher" not in c.launch


# --------------------------------------------------------------------------- redaction


def test_redact():
    env = {"HF_TOKEN": "hf_abc", "WANDB_API_KEY": "k", "AWS_SECRET_ACCESS_KEY": "s", "DB_PASSWORD": "p",
           "hf_token": "lower", "NCCL_DEBUG": "INFO", "PATH": "/bin"}
    r = redact(env)
    assert r == {"HF_TOKEN": "***", "WANDB_API_KEY": "***", "AWS_SECRET_ACCESS_KEY": "***", "DB_PASSWORD": "***",
                 "hf_token": "***", "NCCL_DEBUG": "INFO", "PATH": "/bin"}
    assert env["HF_TOKEN"] == "hf_abc"  # a copy


def test_format_commands_redacts():
    cl = two_node_cluster(env={"HF_TOKEN": "hf_supersecret", "NCCL_DEBUG": "INFO"})
    cmds = build_commands(cl, stage(), "s.json", "r", local_env={"MASTER_PASSWORD": "pw123"})
    assert any("hf_supersecret" in c.argv[-1] for c in cmds)  # the real command carries it...
    text = format_commands(cmds)
    assert "hf_supersecret" not in text and "pw123" not in text  # ...the displayed one never
    assert "HF_TOKEN='***'" in text and "NCCL_DEBUG=INFO" in text
    assert "gpu-a" in text and "machine rank 1" in text and "--machine_rank 1" in text
    assert L._GUARD not in text and "<guard>" in text
    assert all("hf_supersecret" not in repr(c) for c in cmds)
    (loc,) = build_commands(ClusterSpec(env={"HF_TOKEN": "hf_supersecret"}), stage(), "s.json", "r")
    assert "hf_supersecret" not in format_commands([loc]) and "HF_TOKEN='***'" in format_commands([loc])


# --------------------------------------------------------------------------- remote shell quoting (no ssh)


@pytest.mark.parametrize("shell", ["sh", "bash", "dash"])
def test_remote_script_quoting_in_real_shells(tmp_path, shell):
    require(any(os.access(os.path.join(d, shell), os.X_OK) for d in os.environ["PATH"].split(os.pathsep)),
            f"{shell} not installed")
    home = tmp_path / "home"
    weird = "a b;$(touch PWNED)`touch PWNED2` 'q\" \\ * ~ $HOME\nline2"
    (home / weird).mkdir(parents=True)
    env = {"V1": "$(touch PWNED3)", "V2": "x'y\"z;`id` *", "V3": ""}
    code = "import os, json; print(json.dumps([os.getcwd(), os.environ['V1'], os.environ['V2'], os.environ['V3']]))"
    script = _remote_script("~/" + weird, env, PY, ["-c", code])
    r = subprocess.run([shell, "-c", script], capture_output=True, text=True, timeout=30, cwd=tmp_path,
                       env={"HOME": str(home), "PATH": os.environ["PATH"]})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [str(home / weird), *env.values()]
    assert not list(tmp_path.rglob("PWNED*"))
    # `~` alone, and an absolute path
    r = subprocess.run([shell, "-c", _remote_script("~", {}, PY, ["-c", "import os; print(os.getcwd())"])],
                       capture_output=True, text=True, timeout=30, env={"HOME": str(home), "PATH": os.environ["PATH"]})
    assert r.stdout.strip() == str(home)


# --------------------------------------------------------------------------- helpers for real runs


def tagged_pids(tag: str) -> list[int]:
    """Processes carrying CPT_TEST_TAG=<tag> in their environment (all descendants of a test run)."""
    needle = f"CPT_TEST_TAG={tag}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    with open(f"/proc/{d}/stat", "rb") as f2:
                        if f2.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                            out.append(int(d))
        except OSError:
            pass
    return out


def wait_gone(tag: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = tagged_pids(tag)
        if not left:
            return []
        time.sleep(0.2)
    return tagged_pids(tag)


def kill_tagged(tag: str) -> None:
    for pid in tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_files(paths: list[Path], procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.exists() for p in paths):
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            outs = [(p.args[:1], p.returncode, p.communicate(timeout=10)) for p in dead]
            pytest.fail(f"a launcher exited before writing its results: {outs}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {[str(p) for p in paths if not p.exists()]}")


def probe_spec(tmp: Path, name: str, **kw) -> tuple[Path, Path]:
    out = tmp / f"out-{name}"
    spec = tmp / f"spec-{name}.json"
    spec.write_text(json.dumps({"out": str(out), **kw}))
    return spec, out


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """Wait for started runs, collecting output. Not `communicate()`: that closes stdin, which is the
    run's lifeline (the guard ends the run on EOF)."""
    bufs: list[dict] = []
    threads = []
    for p in procs:
        b = {"out": b"", "err": b""}
        bufs.append(b)
        for key, stream in (("out", p.stdout), ("err", p.stderr)):
            if stream is not None:
                t = threading.Thread(target=lambda b=b, k=key, s=stream: b.__setitem__(k, s.read()), daemon=True)
                t.start()
                threads.append(t)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            terminate(procs, timeout=10)
            for t in threads:
                t.join(10)
            errs = [b["err"].decode(errors="replace")[-3000:] for b in bufs]
            pytest.fail(f"run did not finish within {timeout}s: {errs}")
    for t in threads:
        t.join(30)
    return [(p.returncode, b["out"].decode(errors="replace"), b["err"].decode(errors="replace"))
            for p, b in zip(procs, bufs)]


# --------------------------------------------------------------------------- real local runs


def test_local_two_process_run_then_terminate_leaves_nothing(tmp_path):
    tag = uuid.uuid4().hex
    spec, out = probe_spec(tmp_path, "local", sleep=300)
    cl = ClusterSpec(processes_per_node=2, env={"CPT_TEST_TAG": tag, "PYTHONPATH": str(ROOT)})
    (c,) = build_commands(cl, stage(precision="fp32"), str(spec), str(tmp_path), module="tests.dist_probe",
                          cpu=True, kill_grace=5, main_process_port=free_port())
    p = start(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_files([out / "rank0.json", out / "rank1.json"], [p], 120)
        recs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["rank"] for r in recs] == [0, 1]
        assert all(r["world_size"] == 2 and r["sum"] == 3.0 and r["backend"] == "gloo" for r in recs)
        assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" and r["accelerate_num_processes"] == 2
                   for r in recs)
        assert len(tagged_pids(tag)) >= 4  # guard, accelerate/torchrun, 2 workers
        t0 = time.monotonic()
        (rc,) = terminate([p], timeout=30)
        assert time.monotonic() - t0 < 30
        assert rc is not None and rc != 0
        assert wait_gone(tag, 15) == []
    finally:
        if p.poll() is None:
            p.kill()
        kill_tagged(tag)


def test_local_run_ends_when_manager_stdin_closes(tmp_path):
    """The manager dying = its end of the stdin pipe closing: the guard ends the tree."""
    tag = uuid.uuid4().hex
    spec, out = probe_spec(tmp_path, "eof", sleep=300)
    cl = ClusterSpec(env={"CPT_TEST_TAG": tag, "PYTHONPATH": str(ROOT)})
    (c,) = build_commands(cl, stage(), str(spec), str(tmp_path), module="tests.dist_probe", kill_grace=5)
    p = start(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_files([out / "rank0.json"], [p], 120)
        rec = json.loads((out / "rank0.json").read_text())
        assert rec["world_size"] == 1 and rec["distributed_type"] == "DistributedType.NO"
        p.stdin.close()
        p.wait(30)
        assert wait_gone(tag, 15) == []
    finally:
        if p.poll() is None:
            p.kill()
        kill_tagged(tag)


# --------------------------------------------------------------------------- real sshd on loopback


def test_injection_through_real_sshd(sshd_loopback, tmp_path):
    uniq = uuid.uuid4().hex[:12]
    pwned, pwned2 = Path(f"/tmp/pwned_{uniq}"), Path(f"/tmp/pwned2_{uniq}")
    workdir = Path(f"/tmp/a b; touch {pwned}")  # i.e. "/tmp/a b; touch " / "tmp" / "pwned_<uniq>"
    workdir.mkdir(parents=True)
    tag = uuid.uuid4().hex
    try:
        spec, out = probe_spec(tmp_path, "inj", env=["PROBE_X", "PROBE_Y"])
        evil = f"$(touch {pwned2})"
        evil2 = f"`touch {pwned2}`; touch {pwned2} 'x\" \\"
        node = NodeSpec(host="node-a", workdir=str(workdir), python=PY,
                        env={"PROBE_X": evil, "PROBE_Y": evil2, "PYTHONPATH": str(ROOT), "CPT_TEST_TAG": tag})
        cl = ClusterSpec(kind="ssh", processes_per_node=1, nodes=[node])
        (c,) = build_commands(cl, stage(), str(spec), str(tmp_path), module="tests.dist_probe",
                              ssh_config=sshd_loopback.ssh_config, local_env={})
        p = start(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ((rc, o, e),) = finish([p], 120)
        assert rc == 0, e[-3000:]
        rec = json.loads((out / "rank0.json").read_text())
        assert rec["cwd"] == str(workdir)
        assert rec["env"] == {"PROBE_X": evil, "PROBE_Y": evil2}
        assert not pwned.exists() and not pwned2.exists()
        assert wait_gone(tag, 10) == []
    finally:
        for f in (pwned, pwned2):
            if f.exists():
                f.unlink()
        kill_tagged(tag)
        workdir.rmdir()
        for parent in (workdir.parent, workdir.parent.parent):  # shared with other runs: only if empty
            try:
                parent.rmdir()
            except OSError:
                pass


@pytest.mark.parametrize("how", ["kill-ssh-client", "terminate"])
def test_no_orphans_after_ssh_client_goes_away(sshd_loopback, tmp_path, how):
    tag = uuid.uuid4().hex
    spec, out = probe_spec(tmp_path, how, sleep=300)
    node = NodeSpec(host="node-a", workdir=str(ROOT), python=PY,
                    env={"PYTHONPATH": str(ROOT), "CPT_TEST_TAG": tag})
    cl = ClusterSpec(kind="ssh", nodes=[node], processes_per_node=2, main_process_port=free_port())
    (c,) = build_commands(cl, stage(), str(spec), str(tmp_path), module="tests.dist_probe",
                          ssh_config=sshd_loopback.ssh_config, local_env={}, kill_grace=5)
    p = start(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_files([out / "rank0.json", out / "rank1.json"], [p], 120)
        recs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in recs)
        # torchrun puts each worker in its own session: a process-group kill would miss them
        assert len({r["pgid"] for r in recs}) == 2
        remote = tagged_pids(tag)
        assert len(remote) >= 4 and p.pid not in remote
        t0 = time.monotonic()
        if how == "kill-ssh-client":
            os.kill(p.pid, signal.SIGKILL)  # the harshest: no goodbye on the channel
            p.wait(10)
        else:
            terminate([p], timeout=30)
        left = wait_gone(tag, 30)
        assert left == [], f"orphans: {left}"
        assert time.monotonic() - t0 < 30
    finally:
        if p.poll() is None:
            p.kill()
        kill_tagged(tag)


def test_preflight_ok(sshd_loopback):
    cl = ClusterSpec(kind="ssh", nodes=[
        NodeSpec(host="node-a", workdir=str(ROOT), python=PY),  # the workdir is on sys.path for -c
        NodeSpec(host="node-b", workdir="/", python=PY, env={"PYTHONPATH": str(ROOT)}),
    ])
    preflight(cl, ssh_config=sshd_loopback.ssh_config, local_env={})


def test_preflight_unreachable(sshd_loopback):
    port = free_port()  # nothing listens there
    cl = ClusterSpec(kind="ssh", nodes=[NodeSpec(host="node-a", workdir=str(ROOT), python=PY),
                                        NodeSpec(host="127.0.0.1", port=port, python=PY)])
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as ei:
        preflight(cl, ssh_config=sshd_loopback.ssh_config, timeout=5, local_env={})
    msg = str(ei.value)
    assert msg.startswith("node 127.0.0.1: unreachable over ssh: ")
    assert "refused" in msg.lower()
    assert "node-a" not in msg  # the reachable node is fine
    assert time.monotonic() - t0 < 30


def test_preflight_engine_missing_and_missing_workdir(sshd_loopback, tmp_path):
    # A real python without the engine: a bare venv (the project's venv may have it installed editable).
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    bare_py = str(bare / "bin" / "python")
    cl = ClusterSpec(kind="ssh", nodes=[
        NodeSpec(host="node-a", workdir=str(tmp_path), python=bare_py),
        NodeSpec(host="node-b", workdir=str(tmp_path / "nope"), python=bare_py),
    ])
    with pytest.raises(LaunchError) as ei:
        preflight(cl, ssh_config=sshd_loopback.ssh_config, local_env={})
    lines = str(ei.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"node node-a: the engine is not installed for {bare_py}")
    assert "No module named 'engine'" in lines[0] and "pip install" in lines[0]
    assert lines[1].startswith("node node-b: workdir ") and "does not exist" in lines[1]


def test_preflight_python_missing(sshd_loopback, tmp_path):
    cl = ClusterSpec(kind="ssh", nodes=[NodeSpec(host="node-b", workdir=str(tmp_path), python="/nonexistent/python3")])
    with pytest.raises(LaunchError, match=r"^node node-b: the engine is not installed for /nonexistent/python3"):
        preflight(cl, ssh_config=sshd_loopback.ssh_config, local_env={})


def test_telemetry_over_ssh(sshd_loopback):
    cl = ClusterSpec(kind="ssh", nodes=[NodeSpec(host="node-b", workdir=str(ROOT), python=PY)])
    (c,) = build_telemetry_commands(cl, interval=0.2, ssh_config=sshd_loopback.ssh_config, local_env={})
    p = start(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        recs = [json.loads(p.stdout.readline()) for _ in range(2)]
        assert [r["node"] for r in recs] == ["node-b", "node-b"]
        assert all(r["kind"] == "host" and r["metrics"]["ram_total"] > 0 for r in recs)
        terminate([p], timeout=15)
    finally:
        if p.poll() is None:
            p.kill()


# --------------------------------------------------------------------------- 2 nodes in network namespaces


def test_two_node_gloo_run_in_network_namespaces(netns_nodes, tmp_path):
    nn = netns_nodes
    tag = uuid.uuid4().hex
    spec, out = probe_spec(tmp_path, "netns", env=["GLOO_SOCKET_IFNAME"])
    nodes = [NodeSpec(host=al, address=nn.addresses[al], workdir=str(ROOT), python=PY,
                      env={"GLOO_SOCKET_IFNAME": nn.ifnames[al], "PYTHONPATH": str(ROOT), "CPT_TEST_TAG": tag})
             for al in nn.nodes]
    cl = ClusterSpec(kind="ssh", nodes=nodes, processes_per_node=1, main_process_port=29500)
    cmds = build_commands(cl, stage(), str(spec), str(tmp_path), module="tests.dist_probe",
                          ssh_config=nn.ssh_config, local_env={}, cpu=True)
    assert flag(cmds[0].launch, "--main_process_ip") == nn.addresses["node-a"]
    t0 = time.monotonic()
    procs = [start(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, prefix=nn.prefix) for c in cmds]
    try:
        results = finish(procs, 240)
        for (rc, o, e), c in zip(results, cmds):
            assert rc == 0, f"{c.node}: {e[-4000:]}"
        recs = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["rank"] for r in recs] == [0, 1]
        assert all(r["world_size"] == 2 and r["sum"] == 3.0 and r["backend"] == "gloo" for r in recs)
        assert [r["env"]["GLOO_SOCKET_IFNAME"] for r in recs] == [nn.ifnames["node-a"], nn.ifnames["node-b"]]
        assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" for r in recs)
        # the two ranks really ran in the two network namespaces, neither in ours
        assert recs[0]["netns"] != recs[1]["netns"]
        assert os.readlink("/proc/self/ns/net") not in (recs[0]["netns"], recs[1]["netns"])
        assert time.monotonic() - t0 < 240
        assert wait_gone(tag, 15) == []
    finally:
        terminate([p for p in procs if p.poll() is None], timeout=10)
        kill_tagged(tag)


def test_require_skips_locally_and_fails_in_ci(monkeypatch):
    from tests.hosts import require

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no netns here"):
        require(False, "no netns here")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI: no netns here"):
        require(False, "no netns here")
    require(True, "never raised")
