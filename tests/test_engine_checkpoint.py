"""engine/checkpoint.py, engine/metrics.py, engine/faults.py in one process, without a trainer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import CKPT_FORMAT, Checkpointer, read_state, rng_state, set_rng_state
from engine.faults import Faults, prep_kill_after
from engine.layout import TRAINER_STATE, StageLayout
from engine.metrics import SpikeWatch, StepTimer
from engine.spec import CheckpointSpec


class _Dist:
    rank, world = 0, 1

    def barrier(self):
        pass


class _Events:
    def __init__(self):
        self.records = []

    def emit(self, type, **fields):
        self.records.append((type, fields))


def _checkpointer(tmp_path, **spec):
    ck = Checkpointer(StageLayout(tmp_path / "stage"), CheckpointSpec(**spec), tokens_per_step=100,
                      dist=_Dist(), ev=_Events(), deepspeed=False)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    ck.bind(model, model, opt, None, hf_config=False)
    return ck, model, opt


def test_due_every_steps_every_tokens_and_the_end():
    lay = StageLayout("/nowhere")
    steps = Checkpointer(lay, CheckpointSpec(every_steps=3), 100, _Dist(), _Events(), False)
    assert [s for s in range(1, 11) if steps.due(s, s * 100, 10)] == [3, 6, 9, 10]
    tokens = Checkpointer(lay, CheckpointSpec(every_tokens=250), 100, _Dist(), _Events(), False)
    assert [s for s in range(1, 8) if tokens.due(s, s * 100, 7)] == [3, 5, 7]  # crossing 250, 500; the end
    never = Checkpointer(lay, CheckpointSpec(enabled=False), 100, _Dist(), _Events(), False)  # `checkpoint: off`
    assert not never.enabled and not any(never.due(s, s * 100, 5) for s in range(1, 6))


def test_save_is_complete_pruned_and_loads_back(tmp_path):
    ck, model, opt = _checkpointer(tmp_path, every_steps=1, keep_last=2)
    for step in (1, 2, 3):
        path = ck.save(step, step * 100, lambda: {"step": step, "position": step * 4})
        assert path == ck.layout.checkpoint(step) and (path / TRAINER_STATE).exists()
    assert [p.name for p in ck.layout.all_checkpoints()] == ["step-2", "step-3"] and not ck.layout.tmp_checkpoints()
    assert ck.latest() == ck.layout.checkpoint(3)
    state = read_state(ck.latest())
    assert list(state) == ["format", "step", "position"] and state["format"] == CKPT_FORMAT
    assert json.loads((ck.latest() / TRAINER_STATE).read_text())["position"] == 12
    assert ck.ev.records[-1] == ("checkpoint", {"step": 3, "path": str(ck.latest()), "tokens": 300})
    # an interrupted write is never the latest, and rank 0 removes it
    ck.layout.tmp_checkpoint(4).mkdir()
    ck.layout.checkpoint(5).mkdir()  # no trainer_state.json
    assert ck.latest() == ck.layout.checkpoint(3)
    ck.remove_partial()
    assert not ck.layout.tmp_checkpoints()
    # weights, optimizer and RNG come back exactly
    ck2, model2, opt2 = _checkpointer(tmp_path)
    torch.nn.init.zeros_(model2.weight)
    ck2.load_model(ck.latest())
    ck2.load_optimizer(ck.latest(), own=True)
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    random.random(), np.random.rand(), torch.rand(1)
    ck2.load_rng(ck.latest())
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ck2.load_rng(ck.latest())
    assert a == (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_rng_state_round_trip():
    s = rng_state()
    x = torch.rand(3)
    set_rng_state(s)
    assert torch.equal(torch.rand(3), x)


def test_spike_watch_and_step_timer():
    w = SpikeWatch(window=3, factor=2.0)
    assert [w.check(v) for v in (1.0, 1.0, 1.0, 1.9, 4.0)] == [None, None, None, None, pytest.approx(1.3)]
    t = StepTimer(step=10, tokens=1000)
    t.waited(0.5)
    lap = t.lap(step=12, tokens=1400)
    assert lap.data_wait_s == 0.5 and lap.tokens_per_s > 0 and lap.step_time_s >= 0 and lap.elapsed >= 0
    assert t.wait == 0.0 and t.step_last == 12 and t.tokens_last == 1400


def test_faults_from_the_environment():
    f = Faults({"CPT_FAULT_NAN_STEP": "3, 7", "CPT_FAULT_KILL_STEP": "", "CPT_FAULT_SLOW_S": "0"})
    assert f.nan_steps == {3, 7} and f.kill_steps == set() and f.slow == 0.0
    one = torch.ones(())
    assert torch.isnan(f.loss(one, 3, 1)) and f.loss(one, 4, 0) is one
    f.step_begins(1)
    assert prep_kill_after({}) is None and prep_kill_after({"CPT_FAULT_PREP_KILL_AFTER": "100"}) == 100
    assert Faults({}).nan_steps == set()


def test_node_local_dirs_every_node_writes_and_resume_takes_the_step_complete_everywhere(tmp_path, monkeypatch):
    """shared_fs false (node_local_dirs): rank 1 on another node (LOCAL_RANK 0) is its node's directory
    writer: it makes, commits and prunes its own copy. On resume every rank takes the newest step that
    is complete on EVERY node (a crash between two nodes' commits: the previous one)."""
    class NodeDist(_Dist):
        def __init__(self, rank, others):
            self.rank, self.world, self.others = rank, 2, others

        def gather_objects(self, obj):
            return [obj, *self.others] if self.rank == 0 else [*self.others, obj]

    monkeypatch.setenv("LOCAL_RANK", "0")
    node_b = StageLayout(tmp_path / "node-b" / "stage")
    ck = Checkpointer(node_b, CheckpointSpec(every_steps=8, keep_last=1), 100, NodeDist(1, [None]), _Events(),
                      False, node_local=True)
    assert ck.dir_writer  # not rank 0, but its node's first process
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ck.bind(model, model, opt, None, hf_config=False)
    for step in (8, 16):
        ck.save(step, step * 100, lambda: {"step": step, "position": step})
    names = sorted(p.name for p in (node_b.checkpoint(16)).iterdir())
    assert names == ["model.safetensors", "optimizer.pt", "rng-rank1.pt", TRAINER_STATE]  # the node's own copy
    assert [p.name for p in node_b.all_checkpoints()] == ["step-16"]  # pruned on this node too
    assert not ck.ev.records  # only rank 0 writes events
    # node A committed step 24, node B crashed before its commit (a .tmp-step-24 left): both resume at 16
    node_b.tmp_checkpoint(24).mkdir()
    a_steps = [16, 24]
    ck.dist = NodeDist(1, [a_steps])
    assert ck.choose() == node_b.checkpoint(16) and not node_b.tmp_checkpoints()
    # a second process on node B (LOCAL_RANK 1) writes no directories, and agrees
    monkeypatch.setenv("LOCAL_RANK", "1")
    other = Checkpointer(node_b, CheckpointSpec(every_steps=8), 100, NodeDist(1, [a_steps, [16]]), _Events(),
                         False, node_local=True)
    assert not other.dir_writer and other.choose() == node_b.checkpoint(16)
    # no step in common (a node that lost its disk): start over, on every rank
    ck.dist = NodeDist(1, [[24]])
    assert ck.choose() is None
    # without node-local dirs nothing changes: rank 1 writes no directory
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not Checkpointer(node_b, CheckpointSpec(), 100, NodeDist(1, [None]), _Events(), False).dir_writer


def test_fsync_tree_skips_what_another_rank_renames_away_meanwhile(tmp_path, monkeypatch):
    """On a shared run directory a non-writer rank fsyncs the checkpoint's .tmp-step-N while the writer
    still writes into it; libraries write through temporary files they rename (seen in CI: rank 1 died
    with FileNotFoundError on `.tmp-step-32/.tmp5a29Nl`, and its stage restarted). Entries that vanish
    between the listing and their fsync are skipped; the rest are still flushed."""
    import os
    import threading

    from engine import checkpoint as C

    (tmp_path / "sub").mkdir()
    for name in ("model.safetensors", "sub/rng-rank1.pt", ".tmpAbC123"):
        (tmp_path / name).write_bytes(b"x")
    real_walk, synced = os.walk, []

    def walk(top, *a, **kw):  # the writer renames its temporary file right after the listing
        for d, subs, files in real_walk(top, *a, **kw):
            if ".tmpAbC123" in files:
                os.replace(os.path.join(d, ".tmpAbC123"), os.path.join(d, "config.json"))
            yield d, subs, files

    real_fsync = os.fsync
    monkeypatch.setattr(C.os, "walk", walk)
    monkeypatch.setattr(C.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                  real_fsync(fd)))
    C.fsync_tree(tmp_path)
    assert {Path(p).relative_to(tmp_path).as_posix() for p in synced} >= {"model.safetensors", "sub/rng-rank1.pt",
                                                                        ".", "sub"}
    monkeypatch.undo()

    # The same race for real: another process renaming temporary files while the tree is fsynced.
    import subprocess
    import sys
    import time

    code = ("import os, sys\nd = sys.argv[1]\ni = 0\nwhile True:\n"
            "    t = os.path.join(d, '.tmp%06d' % i)\n    open(t, 'wb').write(b'y')\n"
            "    os.replace(t, os.path.join(d, 'part-%d.bin' % (i % 7)))\n    i += 1\n")
    w = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    errors, deadline = [], time.monotonic() + 3
    try:
        while time.monotonic() < deadline and not errors:
            try:
                C.fsync_tree(tmp_path)
            except OSError as e:
                errors.append(e)
    finally:
        w.kill()
        w.wait()
    assert not errors, errors
