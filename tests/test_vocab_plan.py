"""Vocabulary extension inside a plan: the tiny EEVE plan (presets/tiny-vocab-demo.yaml) through the
real CLI, `cpt-tui vocab`, bad input, and the resize of a model smaller than its tokenizer (seed 004).

The target-language corpus is synthetic Vietnamese-like text (tests/vocab_corpus.py) written to
${CPT_DATA}/vi/ where the preset reads it. One full run per module; prepared data is shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.demo_run import run_cli
from tests.vocab_corpus import write_vi_corpus


@pytest.fixture(scope="module")
def vi_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    write_vi_corpus(data)
    return data


@pytest.fixture(scope="module")
def eeve_run(tmp_path_factory, shared_cache, vi_data):
    """One real `cpt-tui --run tiny-vocab-demo` (its own home, the session's shared cache)."""
    from tests.demo_run import cli_env

    home = tmp_path_factory.mktemp("vocab-home")
    env = {**cli_env(home, shared_cache), "CPT_DATA": str(vi_data)}
    r = run_cli(["--run", "tiny-vocab-demo"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = Path(next(l for l in r.stdout.splitlines() if l.startswith("run ")).split("(")[1].rstrip(")"))
    return {"result": r, "env": env, "run_dir": run_dir,
            "prepared": json.loads((run_dir / "prepared.json").read_text())}


def _state(model_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_plan_runs_all_stages(eeve_run):
    out = eeve_run["result"].stdout
    stages = ["eeve-3", "eeve-4", "eeve-6", "eeve-7", "anneal", "context-256"]
    for s in stages:
        assert f"[{s}] done" in out, out[-3000:]
        assert (eeve_run["run_dir"] / "stages" / s / "final" / "model.safetensors").exists()
    assert "vocabulary: +320 tokens" in out  # the report event reaches the CLI


def test_prepared_uses_extended_model_and_tokenizer(eeve_run):
    p, run_dir = eeve_run["prepared"], eeve_run["run_dir"]
    assert p["model_dir"] == p["tokenizer_dir"] == str(run_dir / "vocab")
    assert p["old_vocab_size"] == 1024 and p["vocab_size"] == 1344
    cfg = json.loads((run_dir / "stages" / "eeve-3" / "stage.json").read_text())
    assert cfg["old_vocab_size"] == 1024 and cfg["model_dir"] == str(run_dir / "vocab")
    # The data was tokenized with the extended tokenizer: new ids occur in the target-language stream.
    import numpy as np

    from engine.data.pack import open_tokens
    vi = open_tokens(p["sources"]["vi"]["dir"], "train")
    assert int(np.asarray(vi).max()) >= 1024 and (np.asarray(vi[:20000]) >= 1024).mean() > 0.3


def test_report_recorded(eeve_run):
    rep = eeve_run["prepared"]["vocabulary"]
    f = rep["fertility"]["target"]
    drop = 1 - f["after"] / f["before"]
    k = rep["init_kl"]
    print(f"\ntarget fertility {f['before']:.2f} -> {f['after']:.2f} (-{drop:.1%}); English words changed "
          f"{rep['original_changed_word_share']:.3%}; init KL {k['kl']:.1e} nats/token, new-row mass "
          f"{k['new_mass']:.3f} over {k['positions']} positions")
    assert rep["tokens_added"] == 320 and rep["tied_embeddings"] and not rep["heldout_target_is_train"]
    assert drop >= 0.30
    assert rep["original_changed_word_share"] <= 0.01
    assert k["kl"] <= 0.05 and k["positions"] > 1000
    assert json.loads((eeve_run["run_dir"] / "vocab" / "vocab_report.json").read_text()) == rep
    events = [json.loads(l) for l in (eeve_run["run_dir"] / "prepare" / "events.jsonl").read_text().splitlines()]
    assert any(e["type"] == "progress" and e.get("report") == rep for e in events)


def test_old_rows_bit_identical_after_new_row_stage(eeve_run):
    import torch

    run_dir = eeve_run["run_dir"]
    base, after = _state(run_dir / "vocab"), _state(run_dir / "stages" / "eeve-3" / "final")
    key = "model.embed_tokens.weight"
    assert "lm_head.weight" not in after  # tied: one tensor
    old = 1024
    assert torch.equal(after[key][:old], base[key][:old])  # bit-identical, weight decay included
    changed = (after[key][old:] != base[key][old:]).any(1)
    assert changed.float().mean() > 0.5, "most new rows should have learned something"
    for k in base:  # the transformer was frozen
        if k != key:
            assert torch.equal(after[k], base[k]), k
    # Stage 4 trains all embeddings: the old rows move from then on.
    s4 = _state(run_dir / "stages" / "eeve-4" / "final")
    assert not torch.equal(s4[key][:old], base[key][:old])


def test_context_extension_stage_has_longer_sequences(eeve_run):
    cfg = json.loads((eeve_run["run_dir"] / "stages" / "context-256" / "stage.json").read_text())
    assert cfg["stage"]["seq_len"] == 256 and cfg["stage"]["rope_theta"] == 40000


def test_vocab_command_prints_report(eeve_run, tmp_path):
    r = run_cli(["vocab", "tiny-vocab-demo", "--out", str(tmp_path / "v")], eeve_run["env"])
    assert r.returncode == 0, r.stderr
    for words in ("tokens added      320", "tokens/word target", "tokens/word original", "chars/token target",
                  "original words re-tokenized", "init KL", str(tmp_path / "v" / "vocab")):
        assert words in r.stdout, r.stdout
    # Same base + corpus + settings as the run: served from the cache, identical weights.
    assert "(cached)" in (tmp_path / "v" / "prepare" / "events.jsonl").read_text()
    import torch

    a, b = _state(tmp_path / "v" / "vocab"), _state(eeve_run["run_dir"] / "vocab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    j = run_cli(["vocab", "tiny-vocab-demo", "--out", str(tmp_path / "v"), "--json"], eeve_run["env"])
    assert j.returncode == 0, j.stderr
    assert json.loads(j.stdout)["report"] == eeve_run["prepared"]["vocabulary"]


# --------------------------------------------------------------------------- bad input

PRESET = """\
name: bad-vocab
model:
  path: MODEL
tokenizer:
  path: TOKENIZER
vocabulary:
  sources: [vi]
  new_tokens: 50
sources:
  vi: {path: "VI"}
stages:
  - name: s1
    mixture: {weights: {vi: 1.0}, tokens: 4096}
    seq_len: 32
    global_batch_size: 4
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny saved Llama (300 rows, untied): bad input is rejected before its weights are read."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, tie_word_embeddings=False)).save_pretrained(str(out))
    return out


def _tokenizer(tmp_path: Path, kind: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.vocab_corpus import english_paragraphs

    texts = english_paragraphs()[:300]
    out = tmp_path / kind
    if kind == "slow":
        from transformers import BertTokenizerLegacy

        out.mkdir()
        (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
        BertTokenizerLegacy(str(out / "vocab.txt")).save_pretrained(str(out))
        return out
    if kind == "unigram":
        tk, tr = Tokenizer(models.Unigram()), trainers.UnigramTrainer(
            vocab_size=300, special_tokens=["<unk>", "</s>"], unk_token="<unk>", show_progress=False)
    elif kind == "wordpiece":
        tk, tr = Tokenizer(models.WordPiece(unk_token="<unk>")), trainers.WordPieceTrainer(
            vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    else:
        tk, tr = Tokenizer(models.BPE()), trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<unk>", "</s>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if kind == "bpe" else pre_tokenizers.Whitespace()
    tk.train_from_iterator(texts, tr)
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>").save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind, words", [
    ("slow", "slow (Python) tokenizer"),
    ("unigram", "is Unigram; merging new tokens is supported for BPE tokenizers only"),
    ("wordpiece", "is WordPiece; merging new tokens is supported for BPE tokenizers only"),
    ("empty", "target-language corpus is empty"),
])
def test_bad_input_exit_2(kind, words, tmp_path, cpt_home, vi_data, tiny_model):
    vi = vi_data / "vi" / "*.jsonl"
    if kind == "empty":
        vi = tmp_path / "empty.jsonl"
        vi.write_text("")
    tok = _tokenizer(tmp_path, "bpe" if kind == "empty" else kind)
    f = tmp_path / "bad.yaml"
    f.write_text(PRESET.replace("MODEL", str(tiny_model)).replace("TOKENIZER", str(tok)).replace("VI", str(vi)))
    r = run_cli(["vocab", str(f), "--out", str(tmp_path / "out")], cpt_home, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_vocab_command_invalid_preset(tmp_path, cpt_home):
    r = run_cli(["vocab", "tiny-demo"], cpt_home)  # no vocabulary block
    assert r.returncode == 2 and "no `vocabulary` block" in r.stderr
    r = run_cli(["vocab", "tiny-vocab-demo"], {**cpt_home, "CPT_DATA": str(tmp_path / "nothing")})
    assert r.returncode == 2 and "sources.vi.path" in r.stderr and "nothing" in r.stderr


# --------------------------------------------------------------------------- resize (seed 004)


def test_resize_model_smaller_than_tokenizer(tmp_path, tiny_model):
    """A model + a separately enriched tokenizer with more ids: prepare_vocabulary resizes (mean
    init, old rows untouched, cached by content) even without a `vocabulary` block."""
    import torch

    from engine.spec import parse_preset
    from engine.vocab import prepare_vocabulary

    tok = _tokenizer(tmp_path, "bpe")  # 400 ids, the model has 300 rows
    preset = parse_preset(PRESET.replace("MODEL", str(tiny_model)).replace("TOKENIZER", str(tok))
                          .replace("vocabulary:\n  sources: [vi]\n  new_tokens: 50\n", "").replace("VI", "x.jsonl"))
    assert preset.vocabulary is None
    r = prepare_vocabulary(preset, tiny_model, tok, tmp_path / "cache", tmp_path / "run" / "vocab", log=print)
    assert r["old_vocab_size"] == 300 and r["report"]["new_vocab_size"] == 400 and not r["cached"]
    assert r["report"]["padded_vocab_size"] == 448
    old = _state(tiny_model)
    new = _state(r["model_dir"])
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert new[k].shape[0] == 448 and torch.equal(new[k][:300], old[k])
        torch.testing.assert_close(new[k][300:], old[k].mean(0).expand(148, -1))
    again = prepare_vocabulary(preset, tiny_model, tok, tmp_path / "cache", tmp_path / "run2" / "vocab", log=print)
    cached = _state(again["model_dir"])
    assert again["cached"] and cached.keys() == new.keys() and all(torch.equal(cached[k], new[k]) for k in new)
    # Nothing to do when the model has enough rows.
    assert prepare_vocabulary(preset, r["model_dir"], tok, tmp_path / "cache", tmp_path / "run3", log=print) is None


def test_tiny_vocab_plan_validates(cpt_home):
    r = run_cli(["plan", "tiny-vocab-demo", "--json"], cpt_home)  # plan needs no data: CPT_DATA may be unset
    assert r.returncode == 0, r.stderr
    stages = json.loads(r.stdout)["stages"]
    assert [s["name"] for s in stages] == ["eeve-3", "eeve-4", "eeve-6", "eeve-7", "anneal", "context-256"]
    assert stages[0]["trainable"]["input_embeddings"] == "new" and stages[-1]["seq_len"] == 4 * stages[0]["seq_len"]


def test_vinasmol_preset_matches_seed_001():
    from cpt_tui.paths import find_preset
    from engine.spec import load_preset

    p = load_preset(find_preset("vinasmol-eeve-360m"))
    v = p.vocabulary
    assert (v.model, v.output_init, v.target_vocab_size, v.pad_to_multiple_of) == ("bpe", "mean", 55936, 64)
    assert v.sources == ["vi"] and v.original_sources == ["en"]
    names = [s.name for s in p.stages]
    assert names == ["eeve-3", "eeve-4", "eeve-6", "eeve-7", "anneal", "context-8k"]
    tr = {s.name: (s.trainable.input_embeddings, s.trainable.output_embeddings, s.trainable.transformer)
          for s in p.stages}
    assert tr["eeve-3"] == ("new", "new", "frozen") and tr["eeve-4"] == ("none", "all", "frozen")
    assert tr["eeve-6"] == ("all", "all", "trainable") and tr["eeve-7"] == ("none", "none", "trainable")
    assert {s.schedule.lr for s in p.stages} == {1e-4, 2e-4} and {s.schedule.warmup_steps for s in p.stages} == {50}
    assert {s.global_batch_size for s in p.stages} <= set(range(32, 257)) and min(
        s.global_batch_size for s in p.stages) == 32 and max(s.global_batch_size for s in p.stages) == 256
    assert [s.seq_len for s in p.stages[:-1]] == [2048] * 5 and p.stages[-1].seq_len == 8192
