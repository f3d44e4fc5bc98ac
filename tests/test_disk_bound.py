"""The preflight's disk bound for nodes without a shared disk (cpt_tui/backends/sync.py): a LOWER bound
of what each node's workdir will hold, from the preset and its plan alone — the kept checkpoints follow
the step cadence up to keep_last, and rank 0's node also holds every stage's exported model."""

from __future__ import annotations

from cpt_tui.backends import sync
from engine.plan import resolve
from engine.spec import load_preset
from tests.demo_run import tiny_preset


def _bound(tmp_path, stages, every, keep, dtype=None, lora=False):
    import yaml

    path = tiny_preset(tmp_path / "p.yaml", stages, every=every)
    doc = yaml.safe_load(path.read_text())
    for st in doc["stages"]:
        st["checkpoint"]["keep_last"] = keep
        if lora:
            st.update(kind="lora", lora={"r": 2})
    if dtype:
        doc["model"]["dtype"] = dtype
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    preset = load_preset(path)
    plan = resolve(preset)
    return preset, plan, sync.planned_bytes(preset, plan), sync.final_bytes(preset, plan)


def test_checkpoints_follow_the_step_cadence_up_to_keep_last(tmp_path):
    _, plan, parts, _ = _bound(tmp_path, [("s1", 100)], every=20, keep=3)
    b = plan["stages"][0]["memory"]["bytes"]
    one = b["params"] + b["optimizer"]
    assert one > 0 and parts["checkpoints"] == 3 * one  # saves at 20, 40, ..., 100: 5, three kept
    assert _bound(tmp_path, [("s1", 100)], every=20, keep=10)[2]["checkpoints"] == 5 * one  # all five
    assert _bound(tmp_path, [("s1", 100)], every=30, keep=10)[2]["checkpoints"] == 4 * one  # 30, 60, 90, end
    # the largest stage decides (stages run one after another)
    assert _bound(tmp_path, [("s1", 40), ("s2", 100)], every=20, keep=10)[2]["checkpoints"] == 5 * one


def test_rank_0_holds_every_stages_merged_export(tmp_path):
    preset, plan, _, final = _bound(tmp_path, [("s1", 20), ("s2", 20)], every=20, keep=1, dtype="float32")
    total = plan["stages"][0]["params"]["total"]
    assert total > 0 and final == 2 * total * 4  # two stages, fp32
    # a LoRA stage exports the merged model: counted without its adapters (a lower bound)
    _, plan, _, final = _bound(tmp_path, [("s1", 20)], every=20, keep=1, dtype="bfloat16", lora=True)
    p = plan["stages"][0]["params"]
    assert final == (p["total"] - p["trainable"]) * 2 and final <= total * 2
