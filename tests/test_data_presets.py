"""The shipped recipes' mixtures prepare from small local stand-ins of their data (CPT_DATA) and
models (CPT_MODELS), through `cpt-tui prep`; `cpt-tui plan` then shows prepared tokens and epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cpt_tui.paths import find_preset
from tests.demo_run import run_cli
from tests.test_data_bad import tiny_model_dir
from tests.test_data_pack import data_tok, data_tok_dir, make_docs, write_jsonl  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def standins(tmp_path_factory, data_tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("standins")
    data, models = root / "data", root / "models"
    model = tiny_model_dir(root / "tiny-model", data_tok_dir)
    for name in ("Llama-3.2-3B", "Llama-3.1-8B-Instruct", "base-model"):
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        (models / name).symlink_to(model)
    # finemath: parquet shards of every source the preset names
    for i, d in enumerate(["smollm-corpus/fineweb-edu-dedup", "finemath/finemath-3plus", "finemath/finemath-4plus",
                           "finemath/infiwebmath-3plus", "finemath/infiwebmath-4plus", "InfiMM-WebMath-40B",
                           "open-web-math"]):
        (data / d).mkdir(parents=True)
        for j in range(2):
            pq.write_table(pa.table({"text": make_docs(200, seed=100 + 10 * i + j)}), data / d / f"{j:03d}.parquet")
    # Dolmino: a directory of jsonl per subset
    for i, s in enumerate(["dclm", "flan", "pes2o", "wiki", "stackexchange", "math"]):
        write_jsonl(data / "dolmino-mix-1124" / s / "part-0.jsonl", make_docs(60, seed=200 + i))
    # ddp-cluster: jsonl files in nested directories
    write_jsonl(data / "cpt-jsonl" / "a" / "x.jsonl", make_docs(80, seed=300))
    write_jsonl(data / "cpt-jsonl" / "b" / "c" / "y.jsonl", make_docs(80, seed=301))
    return {"CPT_DATA": str(data), "CPT_MODELS": str(models)}


def _scaled(tmp_path: Path, name: str, by: int) -> Path:
    """The preset with max_tokens / val_tokens scaled down `by` times to fit the stand-ins;
    weights, budget, seq_len and everything else as shipped."""
    doc = yaml.safe_load(find_preset(name).read_text())
    for s in doc["sources"].values():
        for k in ("max_tokens", "val_tokens"):
            if s.get(k):
                s[k] //= by
    if by >= 10_000:  # held-out tokens then below one block: the stage could not evaluate (plan refuses that)
        for st in doc["stages"]:
            st.pop("eval", None)
    out = tmp_path / f"{name}-standin.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


@pytest.mark.parametrize("preset", ["finemath-llama3-3b", "dolmino-llama31-8b", "ddp-cluster"])
def test_recipe_mixture_prepares_from_standins(preset, standins, cpt_home, tmp_path):
    env = {**cpt_home, **standins}
    # held-out tokens sized for real data, scaled to the stand-ins (FineMath: one 4096-token block per domain)
    by = {"dolmino-llama31-8b": 10_000, "finemath-llama3-3b": 1_000}.get(preset)
    target = str(_scaled(tmp_path, preset, by)) if by else preset
    r = run_cli(["prep", target], env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prepared" in r.stdout and "epochs" in r.stdout
    prep_dir = Path(env["CPT_TUI_HOME"]) / "prep" / yaml.safe_load(Path(find_preset(target)).read_text())["name"]
    prepared = json.loads((prep_dir / "prepared.json").read_text())
    plan = json.loads(run_cli(["plan", target, "--json"], env).stdout)
    assert plan.get("prepared_from_cache") is True
    (stage,) = plan["stages"]
    mix = {s["source"]: s for s in stage["mixture"]["sources"]}
    assert set(prepared["sources"]) == set(mix)
    for name, s in mix.items():
        assert s["available_tokens"] == prepared["sources"][name]["train_tokens"] > 0
        assert s["epochs"] is not None
    if preset.startswith("dolmino"):
        assert {n: s["weight"] for n, s in mix.items()} == {"dclm": 0.472, "flan": 0.166, "pes2o": 0.0585,
                                                            "wiki": 0.0711, "stackexchange": 0.0245, "math": 0.208}
        for name, src in prepared["sources"].items():  # val_tokens as in the seed (scaled)
            assert src["val_tokens"] == yaml.safe_load(Path(target).read_text())["sources"][name]["val_tokens"]
        assert any("repeats" in w or "cannot fill" in w for w in stage["mixture"]["warnings"])  # 50B from a few KB
    if preset == "ddp-cluster":
        assert stage["mixture"]["epochs"] == 3
        assert all(abs(s["epochs"] - 3) < 0.01 for s in mix.values())
