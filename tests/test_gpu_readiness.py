"""Issue 20: the GPU paths through CPU proxies (no GPU here, in CI, or on the team).

Each test names the item it proves. The engine runs through its real launch path (accelerate launch,
torchrun, DeepSpeed with DS_ACCELERATOR=cpu) on the tiny model of tests/test_engine_train.py.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpt_tui.backends import LaunchError, backend_for, build_commands, dry_run
from engine.layout import StageLayout
from engine.spec import ClusterSpec, NodeSpec, StageSpec, load_preset
from tests.test_engine_train import (ROOT, _env, assert_done, events, launch, log_tail, make_stage,  # noqa: F401
                                     prepared, weights)

PY = sys.executable


def with_keys(out: Path, argv: list[str], *, module: str | None = None, **keys) -> list[str]:
    """Add stage-config keys (device, model_dtype: what engine/plan.py writes) to out/stage.json;
    optionally run `module` instead of engine.train."""
    p = out / "stage.json"
    cfg = json.loads(p.read_text())
    cfg.update(keys)
    p.write_text(json.dumps(cfg, indent=1))
    if module:
        argv = [*argv[:-2], module, argv[-1]]
    return argv


def status(out: Path, state: str) -> list[dict]:
    return [e for e in events(out) if e["type"] == "status" and e["state"] == state]


# --------------------------------------------------------------------------- 10: fp16 fused loss


def test_fp16_fused_loss_gradient_does_not_overflow():
    """Item 10: large hidden values, one target: the unscaled chunk gradient g.T @ h passes 65504 in
    fp16; it is accumulated in fp32 now, and matches the fp32 computation."""
    from engine.loss import linear_cross_entropy

    torch.manual_seed(0)
    n, hdim, vocab = 512, 64, 300
    h = torch.randn(n, hdim).abs() * 400
    w = torch.randn(vocab, hdim) * 0.01
    t = torch.full((n,), 7)

    def run(h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, t, chunk=256)
        loss.backward()
        return loss.float(), h.grad.float(), w.grad.float()

    l32, gh32, gw32 = run(h, w)
    l16, gh16, gw16 = run(h.half(), w.half())
    assert torch.isfinite(gw16).all() and torch.isfinite(gh16).all() and torch.isfinite(l16)
    assert abs(float(l16) - float(l32)) < 1e-2 * float(l32)
    assert torch.allclose(gw16, gw32, rtol=2e-2, atol=2e-2 * float(gw32.abs().max()))
    assert torch.allclose(gh16, gh32, rtol=2e-2, atol=1e-6)
    # under fp16 autocast with fp32 weights (the mixed-precision path) too
    with torch.autocast("cpu", dtype=torch.float16):
        la, gha, gwa = run(h, w)
    assert torch.isfinite(gwa).all() and torch.allclose(gwa, gw32, rtol=2e-2, atol=2e-2 * float(gw32.abs().max()))


# --------------------------------------------------------------------------- 3: map_location


def test_every_checkpoint_torch_load_maps_to_the_cpu(tmp_path, monkeypatch):
    """Item 3: optimizer.pt, scaler.pt, rng-rank*.pt load with map_location='cpu' (then load_state_dict
    moves the state to each parameter's own device); and no torch.load in engine/ lacks map_location."""
    import engine.checkpoint as C
    from engine.layout import StageLayout
    from engine.spec import CheckpointSpec

    class Dist:
        rank, world = 0, 1

        def barrier(self):
            pass

        def broadcast_int(self, v):
            return v

    class Ev:
        def emit(self, *a, **k):
            pass

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu")
    ck = C.Checkpointer(StageLayout(tmp_path), CheckpointSpec(every_steps=1), 8, Dist(), Ev(), deepspeed=False)
    ck.bind(model, model, opt, scaler, hf_config=False)
    path = ck.save(1, 8, lambda: {"step": 1, "position": 8})
    assert ck.choose() == path
    calls = []
    real = torch.load

    def spy(f, *a, **kw):
        calls.append((Path(f).name, kw.get("map_location")))
        return real(f, *a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    ck.load_optimizer(path, own=True)
    ck.load_rng(path)
    assert sorted(calls) == [("optimizer.pt", "cpu"), ("rng-rank0.pt", "cpu"), ("scaler.pt", "cpu")]
    for f in (ROOT / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                    getattr(node.func.value, "id", "") == "torch":
                assert any(k.arg == "map_location" for k in node.keywords), f"{f}:{node.lineno}"


# --------------------------------------------------------------------------- 4, 5, 7, 9: the launcher


def _preset(tmp_path: Path, cluster: dict, precision: str = "bf16") -> Path:
    import yaml

    doc = {"name": "g", "model": {"path": "/nonexistent-model"},
           "sources": {"a": {"path": "builtin:stdlib-prose"}},
           "stages": [{"name": "s1", "mixture": {"weights": {"a": 1.0}, "tokens": 100000}, "seq_len": 64,
                       "micro_batch_size": 1, "global_batch_size": 8, "precision": precision}],
           "cluster": cluster}
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_plan_commands_never_send_cpu_to_ssh_nodes(tmp_path):
    """Item 4: the manager's devices decide nothing for a node: no --cpu from a GPU-less manager."""
    cl = {"kind": "ssh", "processes_per_node": 1, "nodes": [{"host": "10.0.0.1"}, {"host": "10.0.0.2"}]}
    for procs in (1, 2):
        cl["processes_per_node"] = procs
        text = dry_run(load_preset(_preset(tmp_path, cl)))["s1"]
        assert "--cpu" not in text and "--num_processes" in text
    one = {"kind": "ssh", "processes_per_node": 1, "nodes": [{"host": "10.0.0.1"}]}
    assert "--cpu" not in dry_run(load_preset(_preset(tmp_path, one)))["s1"]
    # only an explicit `device: cpu` makes the launcher say so
    assert "--cpu" in dry_run(load_preset(_preset(tmp_path, {**one, "device": "cpu"})))["s1"]
    assert "--cpu" not in dry_run(load_preset(_preset(tmp_path, {"processes_per_node": 1})))["s1"]


def test_processes_per_node_auto_uses_the_gpu_count(tmp_path, monkeypatch):
    """Item 5: a (faked) 8-GPU machine without processes_per_node plans 8 processes, never 1."""
    from engine.plan import resolve

    monkeypatch.setenv("CPT_FAKE_GPU_COUNT", "8")
    preset = load_preset(_preset(tmp_path, {}))
    assert preset.cluster.processes_per_node == "auto"
    assert resolve(preset)["world_size"] == 8
    assert "--num_processes 8" in dry_run(preset)["s1"]
    assert "--multi_gpu" in dry_run(preset)["s1"]
    monkeypatch.setenv("CPT_FAKE_GPU_COUNT", "0")
    assert "--num_processes 1" in dry_run(preset)["s1"]
    monkeypatch.setenv("CPT_FAKE_GPU_COUNT", "8")
    assert "--num_processes 1" in dry_run(load_preset(_preset(tmp_path, {"device": "cpu"})))["s1"]
    # ssh: resolved from each node's preflight probe, or refused with the fix
    ssh = load_preset(_preset(tmp_path, {"kind": "ssh", "nodes": [{"host": "10.0.0.1"}, {"host": "10.0.0.2"}]}))
    with pytest.raises(LaunchError, match="set processes_per_node"):
        dry_run(ssh)
    b = backend_for(ssh.cluster, local_env={})
    b.reports = {"10.0.0.1": {"processes_auto": 8}, "10.0.0.2": {"processes_auto": 8}}
    cmds = b.commands(ssh.stages[0], "s.json", "r", write_configs=False)
    assert all(c.launch[c.launch.index("--num_processes") + 1] == "16" for c in cmds)


def test_local_preflight_refuses_bf16_without_cuda_naming_the_node(tmp_path, monkeypatch):
    """Item 4: bf16/fp16 on a machine where torch sees no CUDA → LaunchError (exit 2) naming the
    node, unless device: cpu. fp32 with device auto trains on the CPU (no probe needed)."""
    st = [StageSpec(name="s", mixture="m", seq_len=8, global_batch_size=1, precision="bf16")]
    monkeypatch.delenv("CPT_FAKE_GPU_COUNT", raising=False)
    b = backend_for(ClusterSpec(processes_per_node=1))
    with pytest.raises(LaunchError, match=r"node local: torch sees no CUDA.*cluster.device: cpu") as e:
        b.preflight(stages=st)
    assert e.value.exit_code == 2
    assert b.reports["local"]["cuda_device_count"] == 0 and b.reports["local"]["device"] == "cpu"
    backend_for(ClusterSpec(processes_per_node=1, device="cpu")).preflight(stages=st)
    with pytest.raises(LaunchError, match="cluster.device is cuda"):
        backend_for(ClusterSpec(processes_per_node=1, device="cuda")).preflight(stages=[])
    monkeypatch.setenv("CPT_FAKE_GPU_COUNT", "2")  # the probe reads it (test-only)
    b = backend_for(ClusterSpec())
    b.preflight(stages=st)
    assert b.reports["local"]["device"] == "cuda" and b.reports["local"]["cuda_device_count"] == 2


def test_ssh_preflight_probes_each_node(sshd_loopback):
    """Items 4, 5: the probe runs on each node (over real sshd); a node without CUDA fails a bf16
    stage by name; the GPU count torch sees on each node resolves processes_per_node auto."""
    st = [StageSpec(name="s", mixture="m", seq_len=8, global_batch_size=4, precision="bf16")]
    nodes = [NodeSpec(host="node-a", workdir=str(ROOT), python=PY, env={"CPT_FAKE_GPU_COUNT": "2"}),
             NodeSpec(host="node-b", workdir="/", python=PY, env={"PYTHONPATH": str(ROOT)})]
    b = backend_for(ClusterSpec(kind="ssh", nodes=nodes), ssh_config=sshd_loopback.ssh_config, local_env={})
    with pytest.raises(LaunchError) as e:
        b.preflight(stages=st)
    assert str(e.value).splitlines() == [l for l in str(e.value).splitlines() if l.startswith("node node-b: ")]
    assert "torch sees no CUDA" in str(e.value) and "node-a" not in str(e.value)
    assert b.reports["node-a"]["cuda_device_count"] == 2 and b.reports["node-b"]["cuda_device_count"] == 0
    nodes = [nodes[0].model_copy(update={"address": "127.0.0.1"}),
             NodeSpec(host="node-b", workdir="/", python=PY, env={"PYTHONPATH": str(ROOT), "CPT_FAKE_GPU_COUNT": "2"})]
    b = backend_for(ClusterSpec(kind="ssh", nodes=nodes), ssh_config=sshd_loopback.ssh_config, local_env={})
    b.preflight(stages=st)
    cmds = b.commands(st[0], "s.json", "r", write_configs=False)
    assert all(c.launch[c.launch.index("--num_processes") + 1] == "4" for c in cmds)
    assert all("--cpu" not in c.launch for c in cmds)


def test_trainer_refuses_without_cuda_and_states_its_device(prepared, tmp_path):
    """Item 4: launched expecting CUDA (device cuda, or bf16 with device auto) on a node without it:
    a failed status naming the node, exit 2, no training. With device cpu: the running event says cpu."""
    import socket

    for name, keys, prec in (("cuda", {"device": "cuda"}, "fp32"), ("auto", {"device": "auto"}, "bf16")):
        out = tmp_path / name
        _, argv = make_stage(prepared, out, steps=2, precision=prec)
        argv = with_keys(out, argv, **keys)
        r = launch(argv, out)
        assert r.returncode != 0
        (failed,) = status(out, "failed")
        assert failed["exit_code"] == 2 and f"node {socket.gethostname()}" in failed["reason"], failed
        assert "DeviceError" in failed["reason"] and not status(out, "running")
    out = tmp_path / "cpu"
    _, argv = make_stage(prepared, out, steps=2, precision="bf16")
    assert_done(launch(with_keys(out, argv, device="cpu"), out), out)
    assert status(out, "running")[0]["device"] == "cpu"


def test_two_local_runs_at_once_both_complete(prepared, tmp_path):
    """Item 9: no fixed main_process_port: two local 2-process runs started together both finish."""
    procs, outs = [], []
    for i in range(2):
        out = tmp_path / f"r{i}"
        make_stage(prepared, out, world=2, steps=3, eval={"every_steps": 100, "max_blocks": 2})
        st = StageSpec.model_validate(json.loads((out / "stage.json").read_text())["stage"])
        (c,) = build_commands(ClusterSpec(processes_per_node=2, device="cpu"), st, str(out / "stage.json"), str(out))
        outs.append((out, c))
    ports = {c.launch[c.launch.index("--main_process_port") + 1] for _, c in outs}
    assert len(ports) == 2  # a free port per attempt, as recorded in stage_started's commands
    for out, c in outs:
        log = open(out / "train.log", "ab")
        procs.append(subprocess.Popen(c.launch, env=_env(c.env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    for (out, _), p in zip(outs, procs):
        assert p.wait(400) == 0, log_tail(out)
        assert status(out, "done")


# --------------------------------------------------------------------------- 1: stop through the launcher


STOP_KW = dict(world=2, steps=3, micro_batch_size=1, global_batch_size=16,
               eval={"every_steps": 100, "max_blocks": 2}, checkpoint={"every_steps": 100, "keep_last": 2})
SLOW = {"CPT_FAULT_SLOW_S": "40", "CPT_FAULT_SLOW_STEPS": "2"}  # step 2: 8 micro-batches of 5 s = 40 s


@pytest.fixture(scope="module")
def stop_reference(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopref")
    _, argv = make_stage(prepared, out, **STOP_KW)
    assert_done(launch(argv, out, timeout=400), out)
    return out


def _stop_and_resume(backend, out: Path, ref: Path):
    lay = StageLayout(out)
    st = StageSpec.model_validate(json.loads(lay.config.read_text())["stage"])
    cmds = backend.commands(st, str(lay.config), str(out))
    procs = backend.start(cmds, lay, 1)
    def seen(kind: str, **match) -> bool:
        return lay.events.exists() and any(e["type"] == kind and all(e.get(k) == v for k, v in match.items())
                                           for e in events(out))

    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not seen("metric", step=1):
            assert all(c is None for c in backend.poll(procs)), log_tail(out)
            time.sleep(0.3)
        time.sleep(3)  # inside the 40 s step 2
        t0 = time.monotonic()
        backend.stop(procs)
        while not seen("status", state="stopped") and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        took = time.monotonic() - t0
        while any(c is None for c in backend.poll(procs)) and time.monotonic() - t0 < 120:
            time.sleep(0.2)  # the processes end after their checkpoint
        time.sleep(1)
    finally:
        backend.stop(procs, force=True)
    # well before the step would have ended (40 s) and before torchrun's (30 s) / the guard's (20 s)
    # default kill delays: the stop took effect between micro-batches
    assert took < 20, (took, log_tail(out))
    (stopped,) = status(out, "stopped")
    assert stopped["step"] == 1 and stopped["exit_code"] == 75
    ck = [e for e in events(out) if e["type"] == "checkpoint"]
    assert ck and ck[-1]["step"] == 1 and (lay.checkpoint(1) / "trainer_state.json").exists()
    assert json.loads((lay.checkpoint(1) / "trainer_state.json").read_text())["position"] == 16
    assert {p.name for p in lay.checkpoint(1).iterdir()} >= {"model.safetensors", "optimizer.pt", "rng-rank0.pt",
                                                              "rng-rank1.pt"}
    # resume (not slowed) → the same weights as the uninterrupted run, bit for bit
    _, argv = make_stage_argv(out)
    assert_done(launch(argv, out, timeout=400), out)
    wa, wb = weights(out / "final"), weights(ref / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def make_stage_argv(out: Path):
    st = StageSpec.model_validate(json.loads((out / "stage.json").read_text())["stage"])
    (c,) = build_commands(ClusterSpec(processes_per_node=2, device="cpu"), st, str(out / "stage.json"), str(out))
    return st, c.launch


def test_stop_mid_step_checkpoints_through_the_local_launcher(prepared, stop_reference, tmp_path):
    """Item 1, local backend: keeper + accelerate + torchrun (2 gloo ranks), a 40 s step."""
    out = tmp_path / "stop-local"
    make_stage(prepared, out, **STOP_KW)
    b = backend_for(ClusterSpec(processes_per_node=2, device="cpu", env=SLOW))
    _stop_and_resume(b, out, stop_reference)


def test_stop_mid_step_checkpoints_through_the_ssh_launcher(prepared, stop_reference, tmp_path, sshd_loopback):
    """Item 1, ssh backend: the stop closes the channel, the node's guard SIGTERMs the tree."""
    out = tmp_path / "stop-ssh"
    make_stage(prepared, out, **STOP_KW)
    node = NodeSpec(host="node-a", workdir=str(ROOT), python=PY,
                    env={"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **SLOW})
    b = backend_for(ClusterSpec(kind="ssh", nodes=[node], processes_per_node=2, device="cpu"),
                    ssh_config=sshd_loopback.ssh_config, local_env={})
    _stop_and_resume(b, out, stop_reference)


# --------------------------------------------------------------------------- 2, 6: ZeRO-3, model.dtype


def _probe(prepared, out: Path, env: dict | None = None, **kw) -> dict:
    keys = {k: kw.pop(k) for k in ("model_dtype", "device") if k in kw}
    _, argv = make_stage(prepared, out, **kw)
    argv = with_keys(out, argv, module="tests.gpu_probe", **keys)
    r = launch(argv, out, {"DS_ACCELERATOR": "cpu", **(env or {})}, timeout=400)
    assert r.returncode == 0, log_tail(out)
    return json.loads((out / "probe.json").read_text())


def _expected_groups(prepared) -> tuple[set, set]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(prepared["model_dir"])
    decay = {n for n, p in m.named_parameters() if p.ndim >= 2}
    return decay, {n for n, _ in m.named_parameters()} - decay


def test_zero3_decay_group_holds_the_real_matrices(prepared, tmp_path, monkeypatch):
    """Item 2: under deepspeed.zero.Init (1 gloo process, DS_ACCELERATOR=cpu) every parameter is a
    1-D placeholder; the decay group still holds exactly the >= 2-D weights of the unpartitioned model.
    DeepSpeed keeps parameters below stage3_param_persistence_threshold (1e5 elements) whole; at a
    real model's size every matrix is above it, so the tiny model here sets the threshold to 0."""
    pytest.importorskip("deepspeed")
    from cpt_tui.backends import accelerate as acc

    orig = acc.deepspeed_config

    def every_param_partitioned(*a, **kw):
        cfg = orig(*a, **kw)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return cfg

    monkeypatch.setattr(acc, "deepspeed_config", every_param_partitioned)
    rep = _probe(prepared, tmp_path / "z3", steps=2, zero_stage=3, optimizer={"weight_decay": 0.1},
                 eval={"every_steps": 100, "max_blocks": 2})
    assert rep["ds"] and rep["partitioned"] and rep["placeholder_ndims"] == [1]
    decay, no_decay = _expected_groups(prepared)
    groups = {g["weight_decay"]: set(g["params"]) for g in rep["groups"]}
    assert groups[0.1] == decay and groups[0.0] == no_decay and decay


def test_zero3_eeve_new_rows_and_start_resume(prepared, tmp_path):
    """Item 2: an EEVE new-rows stage under ZeRO-3 trains, old rows bit-identical; then a ZeRO-3
    `start: resume` from its checkpoint loads the weights (its baseline evaluation equals the first
    stage's last one)."""
    pytest.importorskip("deepspeed")
    old = 256
    a = tmp_path / "eeve3"
    _, argv = make_stage(prepared, a, steps=3, kind="eeve", zero_stage=3, optimizer={"weight_decay": 0.1},
                         trainable={"input_embeddings": "new", "output_embeddings": "new", "transformer": "frozen",
                                    "old_vocab_size": old}, checkpoint={"every_steps": 3, "keep_last": 1},
                         eval={"every_steps": 3, "max_blocks": 2})
    assert_done(launch(argv, a, {"DS_ACCELERATOR": "cpu"}, timeout=400), a)
    before, after = weights(Path(prepared["model_dir"])), weights(a / "final")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(before[k][:old], after[k][:old]), k
        assert not torch.equal(before[k][old:], after[k][old:]), k
    last = {e["domain"]: e["loss"] for e in events(a) if e["type"] == "eval" and e["step"] == 3}
    b = tmp_path / "resume3"
    _, argv = make_stage(prepared, b, steps=5, zero_stage=3, start="resume", **{"from": str(a / "checkpoints" / "step-3")},
                         resume_from=str(a / "checkpoints" / "step-3"), eval={"every_steps": 100, "max_blocks": 2},
                         load_optimizer=False)
    assert_done(launch(argv, b, {"DS_ACCELERATOR": "cpu"}, timeout=400), b)
    base = {e["domain"]: e["loss"] for e in events(b) if e["type"] == "eval" and e["step"] == 3}
    assert base.keys() == last.keys() and all(abs(base[d] - last[d]) < 1e-5 for d in last), (base, last)


@pytest.mark.parametrize("path", ["plain", "zero2", "lora"])
def test_model_dtype_bfloat16_is_loaded_and_trained_in_bf16(prepared, tmp_path, path):
    """Item 6: model.dtype bfloat16 → from_pretrained returns bf16 weights on every path."""
    if path == "zero2":
        pytest.importorskip("deepspeed")
    kw = {"plain": {}, "zero2": {"zero_stage": 2, "precision": "bf16"},
          "lora": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}[path]
    rep = _probe(prepared, tmp_path / path, steps=2, model_dtype="bfloat16", device="cpu",
                 eval={"every_steps": 100, "max_blocks": 2}, **kw)
    assert set(rep["loaded_dtypes"].values()) == {"torch.bfloat16"}, rep["loaded_dtypes"]
    base = {n: d for n, d in rep["trained_dtypes"].items() if "lora_" not in n}
    assert set(base.values()) == {"torch.bfloat16"}, base


def test_export_dtype_is_model_dtype(prepared, tmp_path):
    """Item 6: the export is in model.dtype (float32 by default, as before)."""
    out = tmp_path / "bf16"
    _, argv = make_stage(prepared, out, steps=2, eval={"every_steps": 100, "max_blocks": 2})
    assert_done(launch(with_keys(out, argv, model_dtype="bfloat16", device="cpu"), out), out)
    assert {v.dtype for v in weights(out / "final").values()} == {torch.bfloat16}
    assert status(out, "running")[0]["dtype"] == "bfloat16"
    assert any(e["type"] == "warning" and "no fp32 master" in e["message"] for e in events(out))
