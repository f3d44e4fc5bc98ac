"""Preset → Plan: the resolved, printable view of a preset, and the per-stage JSON the trainer reads.

Pure Python + numpy (no torch): the manager and the UI use it too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from engine.data.builtin import BUILTINS
from engine.data.foreign import data_notes
from engine.data.longdocs import stage_sources
from engine.data.mixture import plan_mixture
from engine.data.sources import DataError, expand_path
from engine.layout import RunLayout
from engine.memory import format_memory, plan_memory
from engine.params import stage_trainable
from engine.rules import PlanError, check_preset, grad_accum  # noqa: F401  (engine.plan.PlanError / grad_accum: API)
from engine.schedule import warmup_steps  # noqa: F401  (engine.plan.warmup_steps: API)
from engine.spec import Preset, StageSpec
from engine.tracker_config import stage_block

STAGE_JSON_VERSION = 1


def processes_per_node(cluster) -> int:
    """`cluster.processes_per_node`, with `auto` resolved for a local cluster: the GPUs of this
    machine (engine/doctor.py gpu_count, no torch import), 1 without any or with `device: cpu`.
    SSH nodes cannot be counted from here: `auto` there is an error naming the fix."""
    n = cluster.processes_per_node
    if n != "auto":
        return n
    if cluster.kind != "local":
        raise PlanError("cluster.processes_per_node", "`auto` (the default) is only resolved for a local cluster: "
                        "set processes_per_node (or each node's `processes`) to the GPUs per node "
                        "(`cpt-tui doctor <preset>` lists what each node has)")
    from engine.gpus import gpu_count

    return 1 if cluster.device == "cpu" else max(1, gpu_count())


def world_size(preset: Preset) -> int:
    c = preset.cluster
    if c.kind == "local":
        return processes_per_node(c)
    if c.kind == "slurm":
        return c.slurm.nodes * processes_per_node(c)
    if all(n.processes for n in c.nodes):
        return sum(n.processes for n in c.nodes)
    return sum(n.processes or processes_per_node(c) for n in c.nodes)


def resolve(preset: Preset, train_tokens: Optional[dict[str, int]] = None, strict: bool = True,
            long_docs: Optional[dict] = None, old_vocab_size: Optional[int] = None) -> dict:
    """The plan as a JSON-able dict: per stage its steps, batch and tokens per source.
    `strict=False`: a stage with 0 steps is reported as a warning instead of raising (plan display).
    `long_docs`: engine.data.run.cached_long_docs / prepared.json's long_docs (shares per stage and source)."""
    train_tokens = train_tokens or {}
    world = world_size(preset)
    check_preset(preset, world)  # engine/rules.py: what the trainer and the launcher would refuse
    stages = []
    for i, st in enumerate(preset.stages):
        mix = preset.mixture_of(st)
        mp = plan_mixture(mix, train_tokens, st.seq_len)
        if mix.tokens is None and not train_tokens:
            total_blocks = None  # epochs: unknown until the data is prepared
        else:
            total_blocks = mp.total_blocks
        accum = grad_accum(st, world, f"stages[{i}].")
        steps = total_blocks // st.global_batch_size if total_blocks is not None else None
        if steps is not None and st.max_steps:
            steps = min(steps, st.max_steps)
        if steps == 0 and not strict:
            mp.sources[0].warnings.append(f"the budget gives 0 steps: less than one global batch "
                                          f"({st.global_batch_size} × {st.seq_len} tokens)")
        elif steps == 0:
            raise PlanError(f"stages[{i}].mixture", f"the budget gives 0 steps: it is less than one global batch "
                            f"({st.global_batch_size} × {st.seq_len} tokens); raise the budget or lower the batch")
        known = mix.tokens is not None or bool(train_tokens)
        mixture_tokens = mp.total_blocks * st.seq_len if known else None
        trained = steps * st.global_batch_size * st.seq_len if steps is not None else None
        stages.append({
            "index": i,
            "name": st.name,
            "kind": st.kind,
            "start": st.start,
            "from": st.from_,
            "seq_len": st.seq_len,
            "micro_batch_size": st.micro_batch_size,
            "global_batch_size": st.global_batch_size,
            "grad_accum": accum,
            "tokens_per_step": st.global_batch_size * st.seq_len,
            "steps": steps,
            "warmup_steps": warmup_steps(st, steps) if steps else st.schedule.warmup_steps,
            "warmup_ratio": st.schedule.warmup_ratio,
            "tokens": trained,
            "mixture_tokens": mixture_tokens,  # what the mixture plans; `tokens` is what trains (whole batches)
            "max_steps": st.max_steps,
            "checkpoint": st.checkpoint.describe(),
            "params": stage_trainable(preset, i, old_vocab_size),
            "lr": st.schedule.lr,
            "schedule": st.schedule.name,
            "precision": st.precision,
            "zero_stage": st.zero_stage,
            "trainable": st.trainable.model_dump(),
            "lora": st.lora.model_dump() if st.lora else None,
            "load_optimizer": st.load_optimizer,
            "load_lr_scheduler": st.load_lr_scheduler,
            "mixture": {
                "name": st.mixture if isinstance(st.mixture, str) else None,
                "budget_tokens": mix.tokens,
                "epochs": mix.epochs,
                "sources": [{
                    "source": s.name, "weight": s.weight, "share": s.share, "tokens": s.tokens if known else None,
                    "available_tokens": train_tokens.get(s.name),
                    "epochs": s.epochs if s.name in train_tokens else None,
                } for s in mp.sources],
                "warnings": mp.warnings,
            },
            "long_docs": st.long_docs.model_dump() if st.long_docs else None,
            "data_notes": data_notes(preset, mix, st, (long_docs or {}).get(st.name)),  # engine.data.foreign
            "memory": _stage_memory(preset, i, steps * st.global_batch_size * st.seq_len if steps else None, world),
        })
    out = {"preset": preset.name, "description": preset.description, "world_size": world,
           "cluster": preset.cluster.kind, "stages": stages, "validation": validation(preset)}
    _check_eval(preset, out["validation"])
    if preset.benchmarks:
        b = preset.benchmarks
        out["benchmarks"] = {"tasks": list(b.tasks), "include_path": b.include_paths(), "num_fewshot": b.num_fewshot,
                             "limit": b.limit, "batch_size": b.batch_size, "reference": b.reference,
                             "stages": b.stage_names(preset)}
    return out


def validation(preset: Preset) -> list[dict]:
    """Held-out validation data per domain: tokens (val_tokens) or a share of documents (val_fraction)."""
    by: dict[str, dict] = {}
    for name, src in preset.sources.items():
        if not (src.val_tokens or src.val_fraction):
            continue
        d = by.setdefault(src.domain or name, {"domain": src.domain or name, "sources": [], "val_tokens": 0,
                                               "val_fraction": None})
        d["sources"].append(name)
        d["val_tokens"] += src.val_tokens
        if src.val_fraction:
            d["val_fraction"] = src.val_fraction
    return list(by.values())


def _check_eval(preset: Preset, val: list[dict]) -> None:
    """A stage that asks for evaluation (an `eval:` block) needs validation data it can use."""
    for i, st in enumerate(preset.stages):
        if "eval" not in st.model_fields_set:
            continue
        usable = [d for d in val if d["val_fraction"] or d["val_tokens"] >= st.seq_len]
        if not usable:
            held = ", ".join(f"{d['domain']} {d['val_tokens']}" for d in val)
            have = f"; the held-out tokens ({held}) are less than one block of seq_len {st.seq_len}" if val else ""
            raise PlanError(f"stages[{i}].eval", "this stage evaluates, but no source holds validation data out"
                            f"{have}: give a source `val_tokens` (or `val_fraction`), or remove the eval block")


def _stage_memory(preset: Preset, index: int, tokens: Optional[int], world: int) -> Optional[dict]:
    """engine.memory's estimate for the plan; None when the model config is unknown or unreadable."""
    try:
        return plan_memory(preset, index, tokens, world)
    except Exception:  # an estimate must never stop a plan
        return None


def format_plan(plan: dict) -> str:
    lines = [f"preset {plan['preset']}: {len(plan['stages'])} stage(s), {plan['world_size']} process(es), {plan['cluster']}"]
    if plan.get("prepared_from_cache"):
        lines.append("(prepared tokens and epochs per source: from the prepared-data cache)")
    for st in plan["stages"]:
        steps = st["steps"] if st["steps"] is not None else "?"
        tokens = f"{st['tokens']:,}" if st["tokens"] is not None else "? (epochs)"
        lines.append(f"\n[{st['index'] + 1}] {st['name']} ({st['kind']}, start: {st['start']}"
                     f"{' ' + st['from'] if st['from'] else ''})")
        lines.append(f"    steps {steps}  tokens {tokens}  seq_len {st['seq_len']}  global batch {st['global_batch_size']}"
                     f" = micro {st['micro_batch_size']} × accum {st['grad_accum']} × {plan['world_size']} proc")
        warm = st["warmup_steps"]
        if warm is None and st.get("warmup_ratio") is not None:
            warm = f"{st['warmup_ratio']:.0%} of the steps"
        lines.append(f"    lr {st['lr']:g} {st['schedule']}, warmup {warm if warm is not None else 0}  precision "
                     f"{st['precision']}  ZeRO {st['zero_stage']}" + ("  LoRA r=%d" % st["lora"]["r"] if st["lora"] else ""))
        lines.extend(format_params(st))
        if st.get("checkpoint"):
            lines.append(f"    checkpoints: {st['checkpoint']}")
        lines.append(f"    {'source':<24} {'weight':>8} {'share':>7} {'tokens':>16} {'prepared':>16} {'epochs':>7}")
        for s in st["mixture"]["sources"]:
            ep = f"{s['epochs']:.2f}" if s["epochs"] is not None else "-"
            avail = f"{s['available_tokens']:,}" if s.get("available_tokens") is not None else "-"
            toks = f"{s['tokens']:,}" if s["tokens"] is not None else "? (epochs)"
            lines.append(f"    {s['source']:<24} {s['weight']:>8g} {s['share']:>7.2%} {toks:>16} {avail:>16} {ep:>7}")
        mt, tt = st.get("mixture_tokens"), st["tokens"]
        if mt is not None and tt is not None and mt > tt:
            why = (f"max_steps {st['max_steps']:,}" if st.get("max_steps") and st["steps"] == st["max_steps"]
                   else f"the partial last global batch ({st['global_batch_size']} × {st['seq_len']} tokens)")
            lines.append(f"    {'not trained':<24} {'':>8} {'':>7} {-(mt - tt):>16,}   {why}")
            lines.append(f"    {'trained':<24} {'':>8} {'':>7} {tt:>16,}")
        if "memory" in st:  # engine.memory: per process, from the model config
            lines.append("    " + format_memory(st["memory"]))
        for n in st.get("data_notes", []):
            lines.append(f"    note: {n}")
        for w in st["mixture"]["warnings"]:
            lines.append(f"    warning: {w}")
    val = plan.get("validation")
    if val is not None:
        lines.append("\nvalidation (held out, never trained on):" if val else "\nvalidation: none (no source has "
                     "val_tokens or val_fraction)")
        for d in val:
            amount = f"{d['val_tokens']:,} tokens" if d["val_tokens"] else f"{d['val_fraction']:.1%} of documents"
            lines.append(f"    {d['domain']:<24} {amount}  (from {', '.join(d['sources'])})")
    b = plan.get("benchmarks")
    if b:
        where = ", ".join((["base-model"] if b["reference"] else []) + b["stages"]) or "none"
        extra = (f"  limit {b['limit']}" if b["limit"] is not None else "") + \
                (f"  num_fewshot {b['num_fewshot']}" if b["num_fewshot"] is not None else "")
        lines.append(f"\nbenchmarks (lm-eval): {', '.join(b['tasks'])}  batch {b['batch_size']}{extra}")
        lines.append(f"    evaluated on: {where}" + (f"  include path: {', '.join(b['include_path'])}"
                                                     if b["include_path"] else ""))
    return "\n".join(lines)


def format_params(st: dict) -> list[str]:
    """The plan's statement of what trains in a stage, with the exact parameter count and share."""
    p = st.get("params") or {}
    if "trainable" not in p:
        return [f"    trains: ? ({p.get('note', 'model unknown')})"]
    approx = "" if p.get("exact") else "≈"
    out = []
    for ph in p["phases"]:
        head = f"steps {ph['steps']}: " if ph["steps"] else ""
        out.append(f"    trains {approx}{ph['trainable']:,} of {approx}{p['total']:,} parameters "
                   f"({ph['trainable'] / p['total']:.2%}): {head}{ph['what']}")
    return out


# --------------------------------------------------------------------------- paths


def _looks_local(p: str) -> bool:
    return p.startswith(("/", ".", "~", "$")) or os.sep in p and os.path.exists(p)


def _model_available(ref: str) -> bool:
    if os.path.isdir(expand_path(ref)):
        return True
    if _looks_local(ref):
        return False
    try:  # a hub id is fine if it is already in the local cache (nothing is downloaded at run time)
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except Exception:
        return False


def missing_paths(preset: Preset) -> list[tuple[str, str]]:
    """(YAML path, problem) for every input that must exist before a run starts, in preset order."""
    out: list[tuple[str, str]] = []
    for where, ref in (("model.path", preset.model.path), ("tokenizer.path", preset.tokenizer.path)):
        if not ref:
            continue
        try:
            if not _model_available(ref):
                out.append((where, f"{expand_path(ref)}: no such directory (and not in the local Hugging Face "
                            f"cache); download it first and point {where} at the directory"))
        except DataError as e:
            out.append((where, str(e)))
    for name, src in preset.sources.items():
        if src.path in BUILTINS:
            continue
        try:
            from engine.data.sources import source_files
            source_files(src)
        except DataError as e:
            out.append((f"sources.{name}.path", str(e)))
    for i, st in enumerate(preset.stages):
        if st.from_ and st.from_ not in {s.name for s in preset.stages} and not os.path.exists(expand_path(st.from_)):
            out.append((f"stages[{i}].from", f"{st.from_}: neither a stage of this preset nor an existing directory"))
    return out


def stage_dir(run_dir: str | Path, stage: StageSpec) -> Path:
    return RunLayout(run_dir).stage(stage.name).root


def stage_config(preset: Preset, index: int, run_dir: str | Path, prepared: dict,
                 init_from: Optional[dict] = None) -> dict:
    """The JSON a trainer process reads (contract version STAGE_JSON_VERSION).
    `init_from` (`--from-stage`, for the run's first stage): {"dir": final model / HF directory,
    "checkpoint": a checkpoint or None}: what the stages this run skips would have left."""
    st = preset.stages[index]
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    names = [s.name for s in preset.stages]

    def final_of(ref: str) -> str:
        return str(layout.stage(ref).final) if ref in names else expand_path(ref)

    previous_final = str(layout.stage(preset.stages[index - 1].name).final) if index else None
    resume_from = None
    skipped = names[:index]
    if init_from and (st.start == "previous" or st.from_ in skipped):  # --from-stage: the earlier run's model
        previous_final = init_from["dir"]
    if init_from and st.start == "resume" and st.from_ in skipped:
        if not init_from.get("checkpoint"):
            raise PlanError(f"stages[{index}].from", f"start: resume from {st.from_!r}: --init-from gave no "
                            "checkpoint to resume from (give RUN:STAGE of a run whose stage left one)")
        resume_from, model_dir = init_from["checkpoint"], previous_final
    elif st.start == "previous":
        model_dir = previous_final or prepared["model_dir"]
    elif st.start == "init_from":
        model_dir = previous_final if init_from and st.from_ in skipped else final_of(st.from_)
    else:  # resume: weights and (per the flags) optimizer / scheduler state from a checkpoint
        if st.from_ in names:
            ck = layout.stage(st.from_).latest_checkpoint()  # complete ones only (trainer_state.json)
            if ck is None:
                raise PlanError(f"stages[{index}].from", f"stage {st.from_!r} left no checkpoint to resume from; "
                                "did it crash before its first checkpoint, or have `checkpoint: off`?")
            resume_from = str(ck)
        else:
            resume_from = expand_path(st.from_)
        model_dir = previous_final or prepared["model_dir"]
    mix = preset.mixture_of(st)
    return {
        "version": STAGE_JSON_VERSION,
        "run_dir": str(run_dir),
        "stage_index": index,
        "stage": st.model_dump(mode="json", by_alias=True),
        "mixture": mix.model_dump(mode="json"),
        "seed": preset.seed,
        "model_dir": model_dir,
        "resume_from": resume_from,
        "tokenizer_dir": prepared["tokenizer_dir"],
        "old_vocab_size": prepared.get("old_vocab_size"),
        "out_dir": str(layout.stage(st.name).root),
        # All prepared sources: the stage trains on its mixture's, and validates on every domain
        # (the forgetting monitor needs the old domains too).
        "sources": stage_sources(prepared, st.name),  # long_docs: the stage's views (engine.data.longdocs)
        "world_size": world_size(preset),
        "device": preset.cluster.device,  # auto | cuda | cpu: the trainer decides on its node (issue 20)
        "model_dtype": preset.model.dtype,
        "trackers": stage_block(preset, index, run_dir, prepared),  # engine/tracker_config.py (None: no trackers)
    }
