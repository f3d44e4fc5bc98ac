"""Cross-field and cross-stage rules of a preset: one home for each, so that `cpt-tui plan` (before any
data is prepared) refuses exactly what the trainer or the launcher would refuse hours later.

Two kinds:
- `check_preset(preset)`: rules that need the whole preset (which fields the YAML set, other stages,
  the vocabulary extension); engine/plan.py resolve() calls it.
- stage rules with the processes they run on (`world`, `deepspeed`): plan calls them with the preset's
  cluster (DeepSpeed when zero_stage > 0, as the launcher decides), the trainer (engine/train.py) with
  the processes it actually got. Same function, same message.

Every error is a PlanError: a YAML path (`stages[1].load_optimizer`) and what would honour the field.
Pure Python: the manager imports this.
"""

from __future__ import annotations

from typing import Optional

from engine.errors import UserError
from engine.spec import Preset, StageSpec


class PlanError(UserError, ValueError):
    """An inconsistency in a valid-looking preset; `yaml_path` says where."""

    def __init__(self, yaml_path: str, msg: str):
        super().__init__(f"{yaml_path}: {msg}")
        self.yaml_path, self.msg = yaml_path, msg


def uses_deepspeed(stage: StageSpec) -> bool:
    """The launcher's rule (cpt_tui/backends/accelerate.py): a DeepSpeed config when zero_stage > 0."""
    return stage.zero_stage > 0


# --------------------------------------------------------------------------- stage rules (plan and trainer)


def grad_accum(stage: StageSpec, world: int, where: str = "") -> int:
    """Micro-batches per optimizer step and process; the global batch must divide evenly."""
    per_step = stage.micro_batch_size * world
    if stage.global_batch_size % per_step:
        raise PlanError(f"{where}global_batch_size",
                        f"{stage.global_batch_size} is not a multiple of micro_batch_size × processes = "
                        f"{stage.micro_batch_size} × {world}; change global_batch_size or micro_batch_size")
    return stage.global_batch_size // per_step


def check_stage_processes(stage: StageSpec, world: int, deepspeed: bool, where: str = "") -> int:
    """What a stage needs of its processes. Returns the gradient accumulation."""
    accum = grad_accum(stage, world, where)
    relora = stage.lora.relora if stage.lora else None
    if stage.lora and stage.zero_stage == 3:
        raise PlanError(f"{where}zero_stage", "LoRA with ZeRO-3 is not supported (peft needs the whole base "
                        "weights on every rank): use zero_stage 1 or 2")
    if relora and deepspeed:
        raise PlanError(f"{where}zero_stage", "ReLoRA under DeepSpeed is not supported (merging needs "
                        "unpartitioned weights and optimizer state); use zero_stage: 0")
    if relora and relora.warm_start_steps and world > 1:
        raise PlanError(f"{where}lora.relora.warm_start_steps", f"a ReLoRA warm start with several processes "
                        f"({world}) is not supported yet: set warm_start_steps: 0 or run on one process")
    return accum


def check_new_rows(stage: StageSpec, old_vocab_size: Optional[int], has_vocabulary: bool, where: str = "") -> None:
    """`trainable: new` trains only rows >= old_vocab_size: it needs that size (set, or recorded by a
    vocabulary extension)."""
    t = stage.trainable
    for field in ("input_embeddings", "output_embeddings"):
        if getattr(t, field) == "new" and not (t.old_vocab_size or old_vocab_size or has_vocabulary):
            raise PlanError(f"{where}trainable.{field}", "`new` trains only the rows added by a vocabulary "
                            "extension, and this preset has none: add a `vocabulary:` block, or set "
                            "trainable.old_vocab_size, or use `all` / `none`")


# --------------------------------------------------------------------------- preset rules (plan)


def _set(model, field: str) -> bool:
    return field in model.model_fields_set


def check_preset(preset: Preset, world: int) -> None:
    """Every rule; the first problem raises (in preset order)."""
    names = [s.name for s in preset.stages]
    for i, st in enumerate(preset.stages):
        w = f"stages[{i}]."
        check_stage_processes(st, world, uses_deepspeed(st), w)
        check_new_rows(st, None, preset.vocabulary is not None, w)
        for flag, what in (("load_optimizer", "the optimizer state (AdamW moments)"),
                           ("load_lr_scheduler", "the schedule's position")):
            if _set(st, flag) and st.start != "resume":
                raise PlanError(w + flag, f"acts only with `start: resume` (it loads {what} of `from:`'s "
                                f"checkpoint), and this stage has `start: {st.start}`, which loads weights only and "
                                f"always starts a fresh optimizer and schedule. Remove {flag}, or set `start: resume` "
                                "with `from:` a stage or checkpoint directory to honour it")
        if st.from_ and st.start == "previous":
            raise PlanError(w + "from", "`from:` acts only with `start: init_from` (its weights) or `start: resume` "
                            "(its checkpoint); with `start: previous` it would be ignored: remove it or set `start:`")
        if st.kind in ("lora", "relora") and st.lora is None:
            raise PlanError(w + "kind", f"kind: {st.kind} needs a `lora:` block (r, alpha, target_modules); without "
                            "it the stage would train every parameter in full")
        if st.lora is not None:
            relora = st.lora.relora
            warm = bool(relora and relora.warm_start_steps)
            for field in ("input_embeddings", "output_embeddings", "transformer", "old_vocab_size"):
                if _set(st.trainable, field) and not warm:
                    raise PlanError(w + f"trainable.{field}", "does not apply to a LoRA stage: the base model is "
                                    "frozen and only the adapters train. Train embeddings or the head in full with "
                                    "lora.modules_to_save: [embed_tokens, lm_head], or other tensors with "
                                    "trainable.include; or remove the field")
            if warm:
                for field in ("input_embeddings", "output_embeddings"):
                    if getattr(st.trainable, field) == "new":
                        raise PlanError(w + f"trainable.{field}", "`new` rows are not guarded during a ReLoRA warm "
                                        "start (every row would learn): use `all` or `none`")
        if st.start == "resume" and st.from_ in names:
            src = preset.stages[names.index(st.from_)]
            if not src.checkpoint.enabled:
                raise PlanError(w + "from", f"stage {st.from_!r} has `checkpoint: off`, so it leaves no checkpoint to "
                                "resume from: give it a checkpoint cadence, or use `start: init_from`")
