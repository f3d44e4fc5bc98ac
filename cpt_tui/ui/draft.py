"""A preset being edited (mixture builder, stage-plan editor, launch): its YAML data as a dict,
validated with the preset schema on every change so the messages are the schema's own.

The file is read and saved with ruamel.yaml's round-trip mode, so a save keeps the user's comments,
key order, flow mappings and quotes (only column alignment inside flow mappings is lost); PyYAML,
faster, serves the validation on every keystroke."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any, Optional

import yaml
from ruamel.yaml import YAML

from engine.plan import PlanError, resolve
from engine.spec import Preset, PresetError, parse_preset

# Stage templates: the fields that make each kind; the rest comes from the stage before.
TEMPLATES: dict[str, dict] = {
    "EEVE 3": {"kind": "eeve", "description": "EEVE stage 3: new input and output embedding rows",
               "trainable": {"input_embeddings": "new", "output_embeddings": "new", "transformer": "frozen"}},
    "EEVE 4": {"kind": "eeve", "description": "EEVE stage 4: all output embeddings",
               "trainable": {"input_embeddings": "none", "output_embeddings": "all", "transformer": "frozen"}},
    "EEVE 6": {"kind": "eeve", "description": "EEVE stage 6: all parameters",
               "trainable": {"input_embeddings": "all", "output_embeddings": "all", "transformer": "trainable"}},
    "EEVE 7": {"kind": "eeve", "description": "EEVE stage 7: transformer layers only",
               "trainable": {"input_embeddings": "none", "output_embeddings": "none", "transformer": "trainable"}},
    "CPT": {"kind": "cpt", "description": "continual pretraining"},
    "Annealing": {"kind": "anneal", "description": "annealing: LR decayed linearly to zero",
                  "schedule": {"name": "linear", "min_lr": 0.0}},
    "Context extension": {"kind": "context_extension", "description": "context extension", "seq_len_factor": 4,
                          "rope_theta": 500000.0},
    "LoRA": {"kind": "lora", "description": "LoRA adapters",
             "lora": {"r": 8, "alpha": 32.0, "dropout": 0.05,
                      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}},
    "ReLoRA": {"kind": "relora", "description": "ReLoRA: LoRA merged and restarted periodically",
               "lora": {"r": 64, "alpha": 32.0, "relora": {"merge_every": 1000, "warm_start_steps": 0,
                                                           "reset": "prune", "rewarmup_steps": 50}}},
}
INHERITED = ("mixture", "seq_len", "micro_batch_size", "global_batch_size", "precision", "schedule", "eval",
             "log_every", "checkpoint")
SLUG = {"EEVE 3": "eeve-3", "EEVE 4": "eeve-4", "EEVE 6": "eeve-6", "EEVE 7": "eeve-7", "CPT": "cpt",
        "Annealing": "anneal", "Context extension": "context", "LoRA": "lora", "ReLoRA": "relora"}


def parse_value(text: str) -> Any:
    """An Input's text as YAML would read it, but `3e-4` is a number too."""
    t = text.strip()
    if t == "":
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    try:
        v = yaml.safe_load(t)
    except yaml.YAMLError:
        return t
    return v if isinstance(v, (bool, list, dict)) else t


def get_path(data: dict, path: str) -> Any:
    cur: Any = data
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def set_path(data: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    cur = data
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}
        cur = cur[p]
    if value is None:
        cur.pop(parts[-1], None)
    else:
        cur[parts[-1]] = value


def _round_trip() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never fold a long line the user wrote on one
    y.indent(mapping=2, sequence=4, offset=2)  # "  - name:" as in presets/
    return y


def plain(obj: Any) -> Any:
    """ruamel's commented containers and scalar subclasses as plain Python values."""
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    for t in (bool, int, float, str):
        if isinstance(obj, t):
            return t(obj)
    return obj


class Draft:
    def __init__(self, data: dict, path: Optional[Path] = None):
        self.data = data
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> "Draft":
        p = Path(path)
        return cls(_round_trip().load(p.read_text(encoding="utf-8")) or {}, p)

    def text(self) -> str:
        """The preset as YAML (plain; what validation parses)."""
        return yaml.safe_dump(plain(self.data), sort_keys=False, allow_unicode=True)

    def file_text(self) -> str:
        """The preset as saved: the loaded file's comments and layout kept."""
        buf = io.StringIO()
        _round_trip().dump(self.data, buf)
        return buf.getvalue()

    def validate(self) -> tuple[Optional[Preset], list[tuple[str, str]]]:
        """(preset or None, [(yaml path, message)]): the schema's messages, then the plan's."""
        try:
            preset = parse_preset(self.text(), self.path or "<draft>")
        except PresetError as e:
            return None, [(p, m) for p, _, m in e.problems]
        try:
            resolve(preset)
        except PlanError as e:
            return preset, [(e.yaml_path, e.msg)]
        return preset, []

    def save(self, path: Optional[str | Path] = None) -> Path:
        p = Path(path) if path else self.path
        if p is None:
            raise ValueError("no file to save to")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(self.file_text(), encoding="utf-8")
        tmp.replace(p)
        self.path = p
        return p

    # ------------------------------------------------------------------ stages
    @property
    def stages(self) -> list[dict]:
        return self.data.setdefault("stages", [])

    def add_stage(self, template: str, after: Optional[int] = None) -> int:
        """Insert a stage made from `template` after `after` (default: at the end); returns its index."""
        tpl = copy.deepcopy(TEMPLATES[template])
        stages = self.stages
        at = len(stages) if after is None else after + 1
        prev = stages[at - 1] if at else (stages[0] if stages else {})
        st: dict = {"name": self._unique(SLUG[template])}
        for k in INHERITED:
            if k in prev:
                st[k] = copy.deepcopy(prev[k])
        factor = tpl.pop("seq_len_factor", None)
        if factor and "seq_len" in st:
            st["seq_len"] = int(st["seq_len"]) * factor
        for k, v in tpl.items():
            if isinstance(v, dict) and isinstance(st.get(k), dict):
                st[k] = {**st[k], **v}
            else:
                st[k] = v
        if "mixture" not in st and self.data.get("mixtures"):
            st["mixture"] = next(iter(self.data["mixtures"]))
        st.setdefault("seq_len", 2048)
        st.setdefault("global_batch_size", 32)
        stages.insert(at, st)
        return at

    def _unique(self, base: str) -> str:
        names = {s.get("name") for s in self.stages}
        if base not in names:
            return base
        k = 2
        while f"{base}-{k}" in names:
            k += 1
        return f"{base}-{k}"

    def remove_stage(self, idx: int) -> None:
        del self.stages[idx]

    def move_stage(self, idx: int, delta: int) -> int:
        j = idx + delta
        if 0 <= j < len(self.stages):
            self.stages[idx], self.stages[j] = self.stages[j], self.stages[idx]
            return j
        return idx

    # ------------------------------------------------------------------ mixtures
    def mixture_targets(self) -> list[tuple[str, str]]:
        """(label, key) of every editable mixture: named ones, then inline stage mixtures."""
        out = [(f"mixture {n}", f"mixtures.{n}") for n in (self.data.get("mixtures") or {})]
        for i, st in enumerate(self.stages):
            if isinstance(st.get("mixture"), dict):
                out.append((f"stage {st.get('name', i)} (inline)", f"stages.{i}.mixture"))
        return out

    def mixture(self, key: str) -> dict:
        kind, name, *rest = key.split(".")
        if kind == "mixtures":
            return self.data["mixtures"][name]
        return self.stages[int(name)]["mixture"]

    def seq_len_of(self, key: str) -> int:
        """The sequence length of the first stage that uses this mixture."""
        kind, name, *_ = key.split(".")
        for i, st in enumerate(self.stages):
            if (kind == "mixtures" and st.get("mixture") == name) or (kind == "stages" and i == int(name)):
                return int(st.get("seq_len") or 2048)
        return 2048
