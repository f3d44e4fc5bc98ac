"""Vocabulary extension (engine/vocab.py) on a tiny English byte-level BPE base + tiny Llama.

The base tokenizer (~1000 ids) and models are trained here on stdlib docstrings; the target
language is synthetic Vietnamese-like text (tests/vocab_corpus.py). Everything is local.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.vocab import VocabError, chars_per_token, extend_vocabulary, fertility, init_kl
from tests.vocab_corpus import english_paragraphs, vietnamese_paragraphs

N_NEW = 300


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpora():
    en = english_paragraphs()
    vi = vietnamese_paragraphs(1600, seed=0)
    return {
        "en_train": [p for i, p in enumerate(en) if i % 10],
        "en_heldout": en[::10],
        "vi_train": vi[:1500],
        "vi_heldout": vi[1500:],
    }


def _save_tokenizer(tk, path: Path, **special) -> Path:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tk, **special).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpora):
    """A byte-level BPE tokenizer (with an added special token above its BPE vocab) and two tiny
    Llamas, tied and untied, trained a few dozen steps on English so their outputs are not uniform."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("base")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpora["en_train"], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tk.add_special_tokens(["<|im_start|>"])  # an added token above the BPE vocab: id 1000
    tok_dir = _save_tokenizer(tk, root / "tokenizer", bos_token="<s>", eos_token="</s>")
    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    assert len(tok) == 1001

    ids = [i for t in corpora["en_train"] for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    seq = 64
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    dirs = {}
    for tied in (True, False):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                          tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            batch = data[torch.randint(len(data), (16,), generator=g)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        dirs[tied] = root / ("tied" if tied else "untied")
        model.save_pretrained(str(dirs[tied]))
    return {"tok_dir": tok_dir, "tied": dirs[True], "untied": dirs[False], "tok": tok}


def _extend(base, corpora, tmp_path_factory, kind, output_init, **kw):
    out = tmp_path_factory.mktemp(f"ext_{kind}_{output_init}")
    if "target_vocab_size" not in kw:
        kw["new_tokens"] = N_NEW
    report = extend_vocabulary(base[kind], base["tok_dir"], corpora["vi_train"], out, output_init=output_init,
                               heldout_target=corpora["vi_heldout"], heldout_original=corpora["en_heldout"], **kw)
    return {"out": out, "report": report, "base_dir": base[kind]}


@pytest.fixture(scope="module")
def tied_mean(base, corpora, tmp_path_factory):
    return _extend(base, corpora, tmp_path_factory, "tied", "mean")


@pytest.fixture(scope="module")
def untied_mean(base, corpora, tmp_path_factory):
    return _extend(base, corpora, tmp_path_factory, "untied", "mean")


@pytest.fixture(scope="module")
def untied_first(base, corpora, tmp_path_factory):
    # Also exercises target_vocab_size: the base uses 1001 ids.
    return _extend(base, corpora, tmp_path_factory, "untied", "first_subword", target_vocab_size=1001 + N_NEW)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))


def _new_tokens_with_subwords(ext, base, n=12):
    """(new id, old-tokenizer subword ids of its text) for n new tokens that are whole characters."""
    _, tok_new = _load(ext["out"])
    out = []
    for tid in range(ext["report"]["first_new_id"], len(tok_new)):
        text = tok_new.decode([tid])
        if "\ufffd" not in text:
            out.append((tid, base["tok"].encode(text, add_special_tokens=False)))
        if len(out) == n:
            break
    assert len(out) == n
    return out


# --------------------------------------------------------------------------- quality figures


def test_original_tokenization_preserved(tied_mean):
    share = tied_mean["report"]["original_changed_word_share"]
    print(f"\nchanged-word share on held-out English: {share:.3%}")
    assert share <= 0.01


def test_target_fertility_drops(tied_mean):
    r = tied_mean["report"]
    f, c = r["fertility"]["target"], r["chars_per_token"]["target"]
    drop = 1 - f["after"] / f["before"]
    print(f"\ntarget fertility {f['before']:.2f} -> {f['after']:.2f} tokens/word (-{drop:.0%}); "
          f"chars/token {c['before']:.2f} -> {c['after']:.2f}; English fertility "
          f"{r['fertility']['original']['before']:.3f} -> {r['fertility']['original']['after']:.3f}")
    assert r["tokens_added"] == N_NEW
    assert drop >= 0.30


def test_init_kl(tied_mean, untied_mean, untied_first):
    for name, ext in [("tied/mean", tied_mean), ("untied/mean", untied_mean), ("untied/first_subword", untied_first)]:
        k = ext["report"]["init_kl"]
        print(f"\n{name}: KL {k['kl']:.2e} nats/token, unnormalised {k['kl_unnormalised']:.4f}, "
              f"new-row mass {k['new_mass']:.4f} (padding {k['pad_mass']:.4f}) over {k['positions']} positions")
        assert k["positions"] > 1000
        assert k["kl"] <= 0.05


def test_init_kl_function_directly(tied_mean, base, corpora):
    from transformers import AutoModelForCausalLM

    ext_model, tok_new = _load(tied_mean["out"])
    base_model = AutoModelForCausalLM.from_pretrained(str(tied_mean["base_dir"]))
    same = init_kl(base_model, base_model, base["tok"], base["tok"], corpora["en_heldout"][:8])
    assert abs(same["kl"]) < 1e-6 and abs(same["new_mass"]) < 1e-6
    ext = init_kl(base_model, ext_model, base["tok"], tok_new, corpora["en_heldout"][:8])
    assert ext["kl"] <= 0.05 and 0 < ext["new_mass"] < 1


def test_report_file_and_sizes(tied_mean):
    r = tied_mean["report"]
    assert json.loads((tied_mean["out"] / "vocab_report.json").read_text()) == r
    assert r["old_vocab_size"] == 1001 and r["first_new_id"] == 1001
    assert r["new_vocab_size"] == 1001 + N_NEW
    assert r["padded_vocab_size"] % 64 == 0 and r["padded_vocab_size"] >= r["new_vocab_size"]


def test_helpers(base, corpora):
    tok = base["tok"]
    assert fertility(tok, ["hello world"]) == len(tok.encode("hello world", add_special_tokens=False)) / 2
    assert chars_per_token(tok, corpora["en_heldout"]) > 2


# --------------------------------------------------------------------------- tokenizer


def test_new_tokens_are_bpe_tokens_and_old_ids_keep(tied_mean, base, corpora):
    _, tok_new = _load(tied_mean["out"])
    old = base["tok"]
    for t in ["<s>", "</s>", "<|im_start|>", "Ġthe", "Ġfunction"]:
        assert tok_new.convert_tokens_to_ids(t) == old.convert_tokens_to_ids(t)
    assert set(tok_new.get_added_vocab()) == set(old.get_added_vocab())  # new words are not added_tokens
    spec = json.loads(tok_new.backend_tokenizer.to_str())
    assert len(spec["model"]["merges"]) == len(json.loads(old.backend_tokenizer.to_str())["model"]["merges"]) + N_NEW
    ids = tok_new.encode(corpora["vi_heldout"][0], add_special_tokens=False)
    assert sum(i >= 1001 for i in ids) > len(ids) // 2
    assert tok_new.decode(ids) == corpora["vi_heldout"][0]


def test_round_trip(tied_mean, corpora, tmp_path):
    model, tok = _load(tied_mean["out"])
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    model2, tok2 = _load(tmp_path)
    sentence = corpora["vi_heldout"][3]
    assert tok2(sentence)["input_ids"] == tok(sentence)["input_ids"]
    assert type(tok2) is type(tok) and len(tok2) == len(tok)
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert model2.config.cpt_old_vocab_size == 1001


# --------------------------------------------------------------------------- embeddings


def _base_model(ext):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ext["base_dir"]))


def test_input_rows_are_subword_means(tied_mean, base):
    model, tok = _load(tied_mean["out"])
    old = _base_model(tied_mean).get_input_embeddings().weight
    new = model.get_input_embeddings().weight
    assert torch.equal(new[:1001], old)  # old rows untouched
    for tid, sub in _new_tokens_with_subwords(tied_mean, base):
        assert len(sub) >= 2
        torch.testing.assert_close(new[tid], old[sub].mean(0))
    for row in new[len(tok):]:  # padding rows: mean of all old rows
        torch.testing.assert_close(row, old.mean(0))


def test_tied_output_is_same_tensor(tied_mean):
    model, _ = _load(tied_mean["out"])
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied_mean["report"]["tied_embeddings"]


@pytest.mark.parametrize("which", ["mean", "first_subword"])
def test_untied_output_init(which, untied_mean, untied_first, base):
    ext = untied_mean if which == "mean" else untied_first
    model, _ = _load(ext["out"])
    base_model = _base_model(ext)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    old_in, old_out = base_model.get_input_embeddings().weight, base_model.get_output_embeddings().weight
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(new_out[:1001], old_out)
    for tid, sub in _new_tokens_with_subwords(ext, base):
        torch.testing.assert_close(new_in[tid], old_in[sub].mean(0))
        torch.testing.assert_close(new_out[tid], old_out[sub].mean(0) if which == "mean" else old_out[sub[0]])
    torch.testing.assert_close(new_out[-1], old_out.mean(0))


# --------------------------------------------------------------------------- bad inputs


def _other_kind_tokenizer(tmp_path, kind, texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if kind == "unigram":
        tk = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>"], unk_token="<unk>",
                                          show_progress=False)
    else:
        tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False)
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(texts, trainer)
    return _save_tokenizer(tk, tmp_path / kind, unk_token=tk.id_to_token(0))


@pytest.mark.parametrize("kind, name", [("unigram", "Unigram"), ("wordpiece", "WordPiece")])
def test_non_bpe_base_rejected(kind, name, tmp_path, base, corpora):
    tok_dir = _other_kind_tokenizer(tmp_path, kind, corpora["en_train"][:200])
    with pytest.raises(VocabError, match="BPE") as e:
        extend_vocabulary(base["tied"], tok_dir, corpora["vi_train"], tmp_path / "out", new_tokens=10)
    assert name in str(e.value)


def test_slow_tokenizer_rejected(tmp_path, base, corpora):
    from transformers import BertTokenizerLegacy

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
    BertTokenizerLegacy(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "slow"))
    with pytest.raises(VocabError, match="slow"):
        extend_vocabulary(base["tied"], tmp_path / "slow", corpora["vi_train"], tmp_path / "out", new_tokens=10)


def test_empty_target_corpus_rejected(tmp_path, base):
    with pytest.raises(VocabError, match="empty"):
        extend_vocabulary(base["tied"], base["tok_dir"], ["", "  \n"], tmp_path / "out", new_tokens=10)


def test_bad_sizes_rejected(tmp_path, base, corpora):
    with pytest.raises(VocabError, match="exactly one"):
        extend_vocabulary(base["tied"], base["tok_dir"], corpora["vi_train"], tmp_path / "out")
    with pytest.raises(VocabError, match="no room"):
        extend_vocabulary(base["tied"], base["tok_dir"], corpora["vi_train"], tmp_path / "out", target_vocab_size=1001)


def test_too_many_tokens_requested_warns(tmp_path, base, corpora):
    logs = []
    with pytest.warns(UserWarning, match=r"only \d+ new tokens found .* 100000 requested"):
        r = extend_vocabulary(base["untied"], base["tok_dir"], corpora["vi_train"][:40], tmp_path / "out",
                              new_tokens=100_000, heldout_original=corpora["en_heldout"][:20], log=logs.append)
    assert 0 < r["tokens_added"] < 100_000 and r["requested"] == 100_000
    assert any(f"only {r['tokens_added']} new tokens" in m for m in logs)


def test_model_rows_beyond_tokenizer(tmp_path, base, corpora):
    """A model with more embedding rows than tokenizer ids (padded, like Qwen): new ids start after
    the rows, the ids in between are unreachable fillers, and no old id or row moves."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "padded"))
    r = extend_vocabulary(tmp_path / "padded", base["tok_dir"], corpora["vi_train"][:300], tmp_path / "out",
                          new_tokens=50, heldout_original=corpora["en_heldout"][:20], log=lambda m: None)
    assert r["old_vocab_size"] == 1024 and r["first_new_id"] == 1024 and r["new_vocab_size"] == 1074
    model, tok = _load(tmp_path / "out")
    assert {t: tok.convert_tokens_to_ids(t) for t in base["tok"].get_vocab()} == base["tok"].get_vocab()
    assert tok.convert_ids_to_tokens(1010) == "<|cpt_reserved_1010|>"
    ids = tok.encode(" ".join(corpora["vi_heldout"][:5]), add_special_tokens=False)
    assert any(i >= 1024 for i in ids) and not any(1001 <= i < 1024 for i in ids)
    old = LlamaForCausalLM.from_pretrained(str(tmp_path / "padded")).get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight[:1024], old)
    assert model.config.cpt_old_vocab_size == 1024 and model.get_input_embeddings().weight.shape[0] == 1088
