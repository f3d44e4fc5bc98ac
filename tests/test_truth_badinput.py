"""Broken presets and data files as a user would write them, generated from the tiny demo by mutation:
every one exits 2 from `plan` (or `--run`, for what only a run checks) with a message naming the file
and, where there is one, the YAML path and line; nothing is written to the database; no traceback.

Classes: YAML edge cases (tabs, empty, top-level list, binary, NUL, duplicate keys, alias bombs and
cycles, deep nesting, several documents, unhashable keys), non-finite and huge numbers, strict types
(bool / float / string where an integer is), unknown keys, cross-field and cross-stage rules the
trainer or launcher enforces (engine/rules.py), references, and input paths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cpt_tui.cli import main
from tests.demo_run import ROOT

DEMO = (ROOT / "presets" / "tiny-demo.yaml").read_text()


def doc() -> dict:
    return yaml.safe_load(DEMO)


def dump(d: dict) -> str:
    return yaml.safe_dump(d, sort_keys=False)


def edit(fn):
    """A mutation of the demo's parsed document."""
    def make():
        d = doc()
        fn(d)
        return dump(d)
    return make


def text(old: str, new: str, count: int = 1):
    """A mutation of the demo's text (what a user types, comments and layout kept)."""
    def make():
        assert old in DEMO, old
        return DEMO.replace(old, new, count)
    return make


def s0(d):
    return d["stages"][0]


def s1(d):
    return d["stages"][1]


BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['lol'] * 10)}]\n" for i in range(9))

# name → (make the file: text or bytes, the CLI mode, fragments the message must contain (regex), a line?)
CASES = {
    # --- YAML itself
    "tab-indent": (text("  prose:\n    path", "  prose:\n\tpath"), "plan", [r"not valid YAML", r"'\\t'"], True),
    "empty-file": (lambda: "", "plan", [r"must be a YAML mapping"], True),
    "only-comments": (lambda: "# nothing here\n", "plan", [r"must be a YAML mapping"], True),
    "top-level-list": (lambda: "- name: tiny-demo\n- stages: []\n", "plan", [r"must be a YAML mapping"], True),
    "scalar-document": (lambda: "tiny-demo\n", "plan", [r"must be a YAML mapping"], True),
    "binary-garbage": (lambda: bytes(range(128, 256)) * 8, "plan", [r"not UTF-8"], False),
    "nul-bytes": (lambda: DEMO[:200] + "\x00\x00" + DEMO[200:], "plan", [r"NUL bytes"], True),
    "duplicate-top-key": (text("seed: 1234\n", "seed: 1234\nname: other\n"), "plan",
                          [r"duplicate key 'name'", r"line 6", r"line 9"], True),
    "duplicate-nested-key": (text("schedule: {name: cosine, lr: 3.0e-3,", "schedule: {name: cosine, lr: 3.0e-3, lr: 1.0e-3,"),
                             "plan", [r"duplicate key 'lr'"], True),
    "duplicate-source": (text("  code:\n    path: builtin:stdlib-code\n",
                              "  code:\n    path: builtin:stdlib-code\n  prose:\n    path: x\n"), "plan",
                         [r"duplicate key 'prose'"], True),
    "alias-bomb": (lambda: DEMO + BOMB, "plan", [r"alias bomb"], True),
    "alias-cycle": (lambda: DEMO + "loop: &loop [1, *loop]\n", "plan", [r"(alias|recursive)"], True),
    "deep-nesting": (lambda: DEMO + "deep: " + "[" * 3000 + "]" * 3000 + "\n", "plan", [r"nested"], False),
    "two-documents": (lambda: DEMO + "---\nname: second\n", "plan", [r"not valid YAML", r"single document"], True),
    "unhashable-key": (lambda: DEMO + "? [a, b]\n: 1\n", "plan", [r"(plain value|unhashable|not valid YAML)"], True),
    "unclosed-flow": (text("{weights: {prose: 1.0}, tokens: 196608}", "{weights: {prose: 1.0}, tokens: 196608"), "plan",
                      [r"not valid YAML"], True),
    # --- numbers
    "nan-weight": (text("{weights: {prose: 1.0}", "{weights: {prose: .nan}"), "plan",
                   [r"stages\[0\]\.mixture\.weights\.prose", r"finite"], True),
    "inf-weight": (text("{code: 0.75,", "{code: .inf,"), "plan", [r"stages\[1\]\.mixture\.weights\.code", r"finite"], True),
    "neg-inf-lr": (text("lr: 3.0e-3", "lr: -.inf"), "plan", [r"stages\[0\]\.schedule\.lr", r"finite"], True),
    "overflow-float": (text("lr: 3.0e-3", "lr: 1.0e400"), "plan", [r"stages\[0\]\.schedule\.lr", r"finite"], True),
    "huge-int-tokens": (text("tokens: 196608}", "tokens: 100000000000000000000000}"), "plan",
                        [r"stages\[0\]\.mixture\.tokens", r"less than or equal"], True),
    "huge-seq-len": (edit(lambda d: s0(d).update(seq_len=10**12)), "plan", [r"stages\[0\]\.seq_len"], True),
    "huge-seed": (edit(lambda d: d.update(seed=2**70)), "plan", [r"seed"], True),
    "negative-weight": (text("{code: 0.75,", "{code: -0.75,"), "plan", [r"weights", r">= 0"], True),
    "zero-weights": (text("{weights: {prose: 1.0}", "{weights: {prose: 0.0}"), "plan", [r"sum to zero"], True),
    # --- strict types
    "bool-as-int": (text("seq_len: 128", "seq_len: true"), "plan", [r"stages\[0\]\.seq_len", r"valid integer"], True),
    "float-as-int": (text("global_batch_size: 16", "global_batch_size: 16.0"), "plan",
                     [r"stages\[0\]\.global_batch_size", r"valid integer"], True),
    "string-as-int": (text("seq_len: 128", "seq_len: '128'"), "plan", [r"stages\[0\]\.seq_len"], True),
    "bool-zero-stage": (edit(lambda d: s0(d).update(zero_stage=True)), "plan", [r"stages\[0\]\.zero_stage", r"boolean"], True),
    "int-as-string": (edit(lambda d: d.update(name=2024)), "plan", [r"name", r"valid string"], True),
    "bool-as-float": (text("lr: 3.0e-3", "lr: yes"), "plan", [r"stages\[0\]\.schedule\.lr"], True),
    "list-as-mapping": (edit(lambda d: d.update(sources=["prose", "code"])), "plan", [r"sources"], True),
    "typo-key": (text("seq_len: 128", "sequence_len: 128"), "plan", [r"stages\[0\]\.sequence_len", r"unknown key"], True),
    # --- rules the trainer / launcher enforce (engine/rules.py), checked by plan
    "load-optimizer-not-resume": (edit(lambda d: s1(d).update(load_optimizer=False)), "plan",
                                  [r"stages\[1\]\.load_optimizer", r"start: resume"], True),
    "load-scheduler-not-resume": (edit(lambda d: s1(d).update(load_lr_scheduler=True)), "plan",
                                  [r"stages\[1\]\.load_lr_scheduler", r"start: resume"], True),
    "lora-zero3": (edit(lambda d: s1(d).update(kind="lora", lora={"r": 4}, zero_stage=3)), "plan",
                   [r"stages\[1\]\.zero_stage", r"ZeRO-3"], True),
    "relora-deepspeed": (edit(lambda d: s1(d).update(kind="relora", lora={"r": 4, "relora": {"merge_every": 10}},
                                                     zero_stage=2)), "plan",
                         [r"stages\[1\]\.zero_stage", r"ReLoRA under DeepSpeed"], True),
    "relora-warm-multiproc": (edit(lambda d: (s1(d).update(kind="relora", lora={"r": 4, "relora": {
        "merge_every": 10, "warm_start_steps": 5}}), d.update(cluster={"processes_per_node": 2}),
        [st.update(micro_batch_size=8) for st in d["stages"]])), "plan",
        [r"warm_start_steps", r"several processes"], True),
    "new-rows-without-vocabulary": (edit(lambda d: s1(d).update(trainable={"input_embeddings": "new"})), "plan",
                                    [r"stages\[1\]\.trainable\.input_embeddings", r"vocabulary"], True),
    "batch-vs-processes": (edit(lambda d: d.update(cluster={"processes_per_node": 3})), "plan",
                           [r"stages\[0\]\.global_batch_size", r"multiple"], True),
    "batch-vs-micro": (text("global_batch_size: 16", "global_batch_size: 24"), "plan", [r"multiple of micro_batch_size"], True),
    "lora-kind-without-block": (edit(lambda d: s1(d).update(kind="lora")), "plan", [r"stages\[1\]\.kind", r"lora"], True),
    "lora-with-trainable": (edit(lambda d: s1(d).update(kind="lora", lora={"r": 4},
                                                        trainable={"input_embeddings": "all"})), "plan",
                            [r"stages\[1\]\.trainable\.input_embeddings", r"does not apply to a LoRA stage"], True),
    "from-with-previous": (edit(lambda d: s1(d).update(**{"from": "base"})), "plan", [r"stages\[1\]\.from"], True),
    "resume-from-checkpoint-off": (edit(lambda d: (s0(d).update(checkpoint="off"),
                                                   s1(d).update(start="resume", **{"from": "base"}))), "plan",
                                   [r"stages\[1\]\.from", r"checkpoint: off"], True),
    "zero-steps": (text("tokens: 196608}", "tokens: 1024}"), "plan", [r"stages\[0\]\.mixture", r"0 steps"], True),
    # --- references
    "unknown-mixture": (edit(lambda d: s0(d).update(mixture="nope")), "plan", [r"stages\[0\]\.mixture", r"unknown mixture"], True),
    "unknown-source-weight": (text("{weights: {prose: 1.0}", "{weights: {poetry: 1.0}"), "plan",
                              [r"stages\[0\]\.mixture\.weights\.poetry", r"unknown source"], True),
    "duplicate-stage": (edit(lambda d: s1(d).update(name="base")), "plan", [r"stages\[1\]\.name", r"duplicate stage"], True),
    "stage-from-later": (edit(lambda d: s0(d).update(start="init_from", **{"from": "cpt-code"})), "plan",
                         [r"stages\[0\]\.from", r"does not run before"], True),
    "unknown-from": (edit(lambda d: s1(d).update(start="init_from", **{"from": "no-such-stage"})), "run",
                     [r"stages\[1\]\.from", r"neither a stage of this preset nor an existing directory"], True),
    # --- data files
    "missing-data-file": (edit(lambda d: d["sources"]["code"].update(path="/nonexistent/code.jsonl")), "run",
                          [r"sources\.code\.path"], True),
    "empty-data-dir": (None, "run", [r"sources\.code\.path"], True),  # made in the test (a directory)
    "glob-matches-nothing": (edit(lambda d: d["sources"]["code"].update(path="/tmp/cpt-no-such-dir-*/x*.parquet")),
                             "run", [r"sources\.code\.path"], True),
    "bad-format": (edit(lambda d: d["sources"]["code"].update(format="csv")), "plan", [r"sources\.code\.format"], True),
    # --- a field that would do nothing: cpt-tui rewrites sbatch's --output to the stage's train.log
    "slurm-extra-output": (edit(lambda d: d.update(cluster={"kind": "slurm", "processes_per_node": 1, "slurm": {
        "extra": ["--exclusive", "--output=/shared/logs/%j.out"]}})), "plan",
        [r"cluster\.slurm\.extra", r"--output=/shared/logs/%j\.out", r"train\.log"], True),
}


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_naming_file_path_line(name, tmp_path, capsys, monkeypatch):
    make, mode, want, has_line = CASES[name]
    home = tmp_path / "home"
    monkeypatch.setenv("CPT_TUI_HOME", str(home))
    monkeypatch.setenv("CPT_TUI_DB", str(home / "cpt-tui.db"))
    preset = tmp_path / f"{name}.yaml"
    if name == "empty-data-dir":
        (tmp_path / "empty").mkdir()
        d = doc()
        d["sources"]["code"]["path"] = str(tmp_path / "empty")
        content = dump(d)
    else:
        content = make()
    if isinstance(content, bytes):
        preset.write_bytes(content)
    else:
        preset.write_text(content)
    argv = ["plan", str(preset)] if mode == "plan" else ["--run", str(preset), "--detach"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (name, out, err)
    assert "Traceback" not in err + out
    assert str(preset) in err, err
    for w in want:
        assert re.search(w, err), (w, err)
    if has_line:
        assert re.search(r"line \d+", err), err
    assert not (home / "cpt-tui.db").exists() and not (home / "runs").exists()  # nothing was created


def test_anchors_and_merge_keys_are_allowed(tmp_path, capsys):
    """Anchors, aliases and `<<:` merges are YAML a user may write: they plan, overrides included."""
    t = DEMO.replace("  - name: base\n", "  - &base\n    name: base\n", 1)
    t = t.replace("  - name: cpt-code\n    kind: cpt\n", "  - <<: *base\n    name: cpt-code\n    kind: cpt\n", 1)
    p = tmp_path / "merge.yaml"
    p.write_text(t)
    assert main(["plan", str(p)]) == 0, capsys.readouterr().err


def test_yaml12_exponents_are_numbers(tmp_path, capsys):
    """`lr: 3e-3` (no dot) is a number as YAML 1.2 says, not the string PyYAML's YAML 1.1 reads."""
    from engine.spec import parse_preset

    p = parse_preset(DEMO.replace("lr: 3.0e-3", "lr: 3e-3"))
    assert p.stages[0].schedule.lr == 3e-3
