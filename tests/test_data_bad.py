"""Bad data: every case gives a clear message (file:line where there is one) and exit code 2, or is
skipped and counted per `on_error`; the sources prepared before it stay intact."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from engine.data.pack import ShardWriter
from engine.data.run import check_vocab_size
from engine.data.sources import DataError
from tests.demo_run import run_cli
from tests.test_data_pack import data_tok, data_tok_dir, make_docs, write_jsonl  # noqa: F401  (fixtures)


def tiny_model_dir(path: Path, tok_dir: Path, vocab_size: int | None = None) -> Path:
    """A model directory with just a config (preparation never loads weights when sizes agree)."""
    import shutil

    from transformers import AutoTokenizer, LlamaConfig

    n = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    LlamaConfig(vocab_size=vocab_size or n, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(str(path))
    for f in Path(tok_dir).iterdir():
        shutil.copy(f, path / f.name)
    return path


PRESET = """\
name: bad-data
model: {{path: {model}}}
tokenizer: {{path: {tok}}}
sources:
  good: {{path: {good}}}
  bad: {{path: {bad}, on_error: {on_error}}}
stages:
  - name: s
    mixture: {{weights: {{good: 0.5, bad: 0.5}}, tokens: 4096}}
    seq_len: 16
    global_batch_size: 4
"""


@pytest.fixture(scope="module")
def bad_env(tmp_path_factory, data_tok_dir):
    root = tmp_path_factory.mktemp("bad")
    good = write_jsonl(root / "good.jsonl", make_docs(40, seed=7))
    model = tiny_model_dir(root / "model", data_tok_dir)
    return root, good, model


def _write_bad(d: Path, case: str) -> Path:
    good_line = json.dumps({"text": "a fine document"}) + "\n"
    if case == "malformed":
        (d / "bad.jsonl").write_text(good_line * 2 + '{"text": "unterminated\n' + good_line)
    elif case == "missing_field":
        (d / "bad.jsonl").write_text(good_line + json.dumps({"body": "wrong key"}) + "\n")
    elif case == "invalid_utf8":
        (d / "bad.jsonl").write_bytes(good_line.encode() * 3 + b'{"text": "caf\xe9 latin-1"}\n')
    elif case in ("empty_docs", "enospc"):
        (d / "bad.jsonl").write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"text": ""}) + "\n"
                                     if case == "empty_docs" else good_line * 50)
    elif case == "empty_source":
        (d / "bad.jsonl").write_text("")
    elif case == "unreadable":
        (d / "bad.jsonl.gz").write_bytes(b"this is not gzip data at all")
        return d / "bad.jsonl.gz"
    return d / "bad.jsonl"


# case → (on_error, words expected in the message, file:line expected)
CASES = {
    "malformed": ("fail", "malformed JSON", "bad.jsonl:3"),
    "missing_field": ("fail", "missing text field 'text'", "bad.jsonl:2"),
    "invalid_utf8": ("fail", "invalid UTF-8", "bad.jsonl:4"),
    "empty_docs": ("skip", "every record was skipped: 2 empty document", "bad.jsonl:1"),
    "empty_source": ("skip", "the source is empty", "bad.jsonl"),
    "unreadable": ("skip", "cannot read", "bad.jsonl.gz"),
    "enospc": ("skip", "no space left on the device", "bad"),
    "vocab_mismatch": ("skip", "belongs to another model", "vocab_size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_exit_2_message_and_good_source_intact(case, bad_env, data_tok_dir, tmp_path, monkeypatch, capsys):
    from engine import prepare

    root, good, model = bad_env
    on_error, words, where = CASES[case]
    bad = _write_bad(tmp_path, "enospc" if case == "vocab_mismatch" else case)
    if case == "vocab_mismatch":  # a model made for a tokenizer ten times larger
        model = tiny_model_dir(tmp_path / "other-model", data_tok_dir, vocab_size=10 * 400 + 5000)
    if case == "enospc":
        real = ShardWriter.write

        def full_disk(self, arr):
            if "bad-" in str(self.dir):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, arr)
        monkeypatch.setattr(ShardWriter, "write", full_disk)
    run = tmp_path / "run"
    run.mkdir()
    (run / "preset.yaml").write_text(PRESET.format(model=model, tok=data_tok_dir, good=good, bad=bad, on_error=on_error))
    cache = root / "cache"  # shared by the cases: "good" is prepared once and must stay intact
    code = prepare.main([str(run), "--cache", str(cache)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and where in err, err
    goods = list((cache / "prepared").glob("good-*/manifest.json"))
    if case != "vocab_mismatch":  # that check runs before any source is read
        assert len(goods) == 1
        man = json.loads(goods[0].read_text())
        assert man["train"]["tokens"] > 0 and (goods[0].parent / man["train"]["shards"][0]["file"]).stat().st_size
    assert not any((cache / "prepared").glob("bad-*/manifest.json"))  # nothing incomplete marked complete
    events = (run / "prepare" / "events.jsonl").read_text()
    assert '"state": "failed"' in events


def test_skip_and_count_reports_first_location(tmp_path, bad_env, data_tok_dir):
    from engine import prepare

    root, good, model = bad_env
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "one fine document"}\n{"text": oops}\n'
                                         b'{"body": "x"}\n{"text": "caf\xe9"}\n{"text": ""}\n{"text": "two"}\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "preset.yaml").write_text(PRESET.format(model=model, tok=data_tok_dir, good=good,
                                                   bad=tmp_path / "bad.jsonl", on_error="skip"))
    assert prepare.main([str(run), "--cache", str(tmp_path / "cache")]) == 0
    src = json.loads((run / "prepared.json").read_text())["sources"]["bad"]
    assert src["documents"] == 2
    assert src["skipped"] == {"malformed JSON": 1, "missing text field 'text'": 1, "invalid UTF-8": 1,
                              "empty document": 1}
    warnings = [json.loads(l) for l in (run / "prepare" / "events.jsonl").read_text().splitlines()]
    msgs = [w["message"] for w in warnings if w["type"] == "warning"]
    assert any("malformed JSON" in m and "bad.jsonl:2" in m for m in msgs), msgs


def test_tokenizer_larger_than_model_is_refused(tmp_path, data_tok_dir):
    model = tiny_model_dir(tmp_path / "m", data_tok_dir, vocab_size=300)
    with pytest.raises(DataError, match="would index past the embedding"):
        check_vocab_size(400, model, data_tok_dir)
    check_vocab_size(400, tiny_model_dir(tmp_path / "m2", data_tok_dir, vocab_size=448), data_tok_dir)  # padding: fine


def test_cli_prep_bad_data_exit_2(tmp_path, bad_env, data_tok_dir, cpt_home):
    root, good, model = bad_env
    bad = _write_bad(tmp_path, "malformed")
    f = tmp_path / "p.yaml"
    f.write_text(PRESET.format(model=model, tok=data_tok_dir, good=good, bad=bad, on_error="fail"))
    r = run_cli(["prep", str(f)], cpt_home, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "bad.jsonl:3: malformed JSON" in r.stderr, r.stderr
