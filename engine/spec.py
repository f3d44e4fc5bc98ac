"""The preset schema: pydantic models for a CPT plan, and YAML loading with precise errors.

Pure Python (pydantic + pyyaml): the UI process imports this, so it must never import torch.
A preset is YAML; `load_preset(path)` validates it into a `Preset`. Every error names the file,
the YAML path (`stages[2].schedule.warmup_steps`) and the line, plus what to do.
"""

from __future__ import annotations

from engine.errors import UserError
import re
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)
from typing_extensions import Annotated

SPEC_VERSION = 1


# `precision` → accelerate's --mixed_precision (one home: the launcher and the trainer both read it).
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

# Bounds of integer fields: large enough for any real run, small enough that no plan arithmetic (numpy
# int64, SQLite INTEGER) overflows and a typo with three extra zeros is refused, not run.
MAX_TOKENS = 10**15  # token budgets and caps (a quadrillion)
MAX_DIM = 1 << 24  # sizes of one model dimension, vocabularies, sequence lengths, batches
MAX_STEPS = 10**12  # step counts and cadences
MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a preset must never be silently ignored. Types are strict (no
    # bool or float where an integer is expected, no number where a string is), numbers finite.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False)


def _no_bool(v):
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {v}")
    return v


# --------------------------------------------------------------------------- model


class ArchConfig(_Strict):
    """A Llama-style architecture, for a model built from scratch (demo, tests, ablations)."""

    hidden_size: int = Field(64, gt=0, le=MAX_DIM)
    intermediate_size: int = Field(128, gt=0, le=MAX_DIM)
    num_hidden_layers: int = Field(2, gt=0, le=100_000)
    num_attention_heads: int = Field(4, gt=0, le=MAX_DIM)
    num_key_value_heads: Optional[int] = Field(None, gt=0, le=MAX_DIM)
    max_position_embeddings: int = Field(2048, gt=0, le=MAX_DIM)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool = False
    vocab_size: Optional[int] = Field(None, gt=0, le=MAX_DIM, description="default: the tokenizer's length")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class ModelSpec(_Strict):
    """The starting model: a local path / hub id of a Hugging Face model, or an architecture."""

    path: Optional[str] = None
    config: Optional[ArchConfig] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _one_of(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of `path` (a Hugging Face model directory or id) or `config` (an architecture to build)")
        return self


class TokenizerTrainSpec(_Strict):
    """Train a byte-level BPE tokenizer on the fly (demo / from-scratch models)."""

    sources: list[str] = Field(min_length=1)
    vocab_size: int = Field(1024, ge=260, le=MAX_DIM)
    max_chars: int = Field(5_000_000, gt=0, le=MAX_TOKENS, description="characters of text to train on")


class TokenizerSpec(_Strict):
    path: Optional[str] = Field(None, description="default: the model's path")
    train: Optional[TokenizerTrainSpec] = None
    add_bos: Optional[bool] = Field(None, description="default: the tokenizer's own convention")

    @model_validator(mode="after")
    def _not_both(self):
        if self.path is not None and self.train is not None:
            raise ValueError("give `path` or `train`, not both")
        return self


class VocabularySpec(_Strict):
    """Vocabulary extension for a new language (EEVE / mean-of-subwords initialisation)."""

    sources: list[str] = Field(min_length=1, description="target-language sources to train new tokens on")
    new_tokens: Optional[int] = Field(None, gt=0, le=MAX_DIM)
    target_vocab_size: Optional[int] = Field(None, gt=0, le=MAX_DIM)
    min_frequency: int = Field(2, ge=1, le=MAX_TOKENS)
    model: Literal["bpe"] = "bpe"
    output_init: Literal["mean", "first_subword"] = "mean"
    pad_to_multiple_of: int = Field(64, ge=1, le=MAX_DIM)
    max_chars: int = Field(50_000_000, gt=0, le=MAX_TOKENS, description="characters of target text to train on")
    original_sources: list[str] = Field(default_factory=list, description="original-language sources whose "
                                        "documents measure what changed (default: stdlib docstrings, English)")

    @model_validator(mode="after")
    def _size(self):
        if (self.new_tokens is None) == (self.target_vocab_size is None):
            raise ValueError("give exactly one of `new_tokens` or `target_vocab_size`")
        return self


# --------------------------------------------------------------------------- data

BUILTIN_SOURCES = ("builtin:stdlib-prose", "builtin:stdlib-code")


class SourceSpec(_Strict):
    """One corpus. `path` is a file, directory, glob, HF dataset dir, or `builtin:stdlib-prose|code`."""

    path: str
    format: Literal["auto", "jsonl", "parquet", "text", "hf", "mds", "datatrove", "megatron", "tokens"] = Field(
        "auto", description="text formats (auto, jsonl, parquet, text, hf) are tokenized; already-tokenized data is "
        "read as written: mds (MosaicML streaming / LLM-Foundry), datatrove (.ds + .ds.index + .ds.metadata), "
        "megatron (.bin + .idx), tokens (parquet / jsonl with a list of ids per row)")
    text_field: str = "text"
    ids_field: str = Field("input_ids", description="format: tokens: the column holding the token ids")
    tokenizer_check: Literal["fail", "warn"] = Field(
        "fail", description="already-tokenized formats: a vocabulary / EOS / tokenizer-name mismatch with the "
        "preset's tokenizer fails preparation, or (warn) is reported and the data used anyway")
    sample_by: Literal["document", "paragraph", "line"] = Field(
        "document", description="text files: one document per file, per blank-line-separated paragraph, "
        "or per line (the options of datasets' text loader; blank lines are separators, not documents)")
    max_tokens: Optional[int] = Field(None, gt=0, le=MAX_TOKENS, description="cap on training tokens taken from this source")
    sample: Literal["first", "shuffled"] = Field(
        "first", description="with max_tokens: the first documents in file order, or a seeded random subset of "
        "documents (LLM-Foundry's --shuffle)")
    sample_seed: int = Field(0, ge=0, le=MAX_SEED, description="sample: shuffled: the seed of the document subset")
    val_tokens: int = Field(0, ge=0, le=MAX_TOKENS, description="tokens held out for validation, never trained on")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="instead of val_tokens: this share of documents "
                                "(every n-th) is held out, as run_clm's validation_split_percentage")
    on_error: Literal["skip", "fail"] = "skip"
    domain: Optional[str] = Field(None, description="validation domain label (default: the source name)")
    keep_boundaries: bool = Field(False, description="also store each training document's start offset "
                                  "(train-docs.idx), for intra-document attention masks")

    @model_validator(mode="after")
    def _one_val(self):
        if self.val_tokens and self.val_fraction:
            raise ValueError("give `val_tokens` or `val_fraction`, not both")
        if self.sample == "shuffled" and self.max_tokens is None:
            raise ValueError("sample: shuffled draws a random subset up to max_tokens: give `max_tokens` "
                             "(without a cap every document is used anyway)")
        return self


class MixtureSpec(_Strict):
    """Token-weighted mixture over sources with a budget (`tokens`) or a number of passes (`epochs`)."""

    weights: dict[str, float] = Field(min_length=1)
    tokens: Optional[int] = Field(None, gt=0, le=MAX_TOKENS, description="total training tokens of the stage")
    epochs: Optional[float] = Field(None, gt=0, le=1e6, description="instead of tokens: passes over every source")
    shuffle: bool = True
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    max_repeats: float = Field(4.0, gt=0, description="warn when a source repeats more often than this")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]):
        for name, w in v.items():
            if w < 0:
                raise ValueError(f"weight of source {name!r} is {w}: weights must be >= 0")
        if sum(v.values()) <= 0:
            raise ValueError("weights sum to zero: give at least one source a positive weight")
        return v

    @model_validator(mode="after")
    def _budget(self):
        if (self.tokens is None) == (self.epochs is None):
            raise ValueError("give exactly one of `tokens` (a token budget) or `epochs`")
        return self


# --------------------------------------------------------------------------- stages


class TrainableSpec(_Strict):
    """Which parameters train. `new` = only rows >= old_vocab_size (EEVE); old rows stay bit-identical."""

    input_embeddings: Literal["none", "new", "all"] = "all"
    output_embeddings: Literal["none", "new", "all"] = "all"
    transformer: Literal["frozen", "trainable"] = "trainable"
    old_vocab_size: Optional[int] = Field(None, gt=0, le=MAX_DIM, description="default: recorded by vocabulary extension")
    include: list[str] = Field(default_factory=list, description="regexes of parameter names to train as well")
    exclude: list[str] = Field(default_factory=list, description="regexes of parameter names to freeze")

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, v: list[str]):
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{p!r} is not a valid regular expression: {e}") from None
        return v


class ReloraSpec(_Strict):
    merge_every: int = Field(gt=0, le=MAX_STEPS, description="merge LoRA into the base and re-initialise every T steps")
    warm_start_steps: int = Field(0, ge=0, le=MAX_STEPS, description="full-rank steps before LoRA starts")
    reset: Literal["optimizer", "prune"] = "prune"
    prune_ratio: float = Field(0.999, ge=0, le=1)
    rewarmup_steps: int = Field(50, ge=0, le=MAX_STEPS, description="LR re-warmup after each merge (jagged schedule)")


class LoraSpec(_Strict):
    r: int = Field(8, gt=0, le=MAX_DIM)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list[str] = Field(default_factory=list)
    relora: Optional[ReloraSpec] = None


class ScheduleSpec(_Strict):
    name: Literal["cosine", "linear", "constant", "wsd", "inverse_sqrt"] = "cosine"
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: Optional[int] = Field(None, ge=0, le=MAX_STEPS)
    warmup_ratio: Optional[float] = Field(None, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: the final fraction of steps that decays")

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give `warmup_steps` or `warmup_ratio`, not both")
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        return self


class OptimizerSpec(_Strict):
    weight_decay: float = Field(0.1, ge=0)
    betas: Annotated[tuple[float, float], Field(strict=False)] = (0.9, 0.95)  # a YAML list
    eps: float = Field(1e-8, gt=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)


DEFAULT_CHECKPOINT_MINUTES = 30.0  # a stage without a cadence: a crash never costs more than this


class CheckpointSpec(_Strict):
    """When a stage checkpoints. Without any cadence (no `checkpoint:` block, or a block that sets none):
    every DEFAULT_CHECKPOINT_MINUTES minutes of training time and at the end. `checkpoint: off`: never."""

    every_minutes: Optional[float] = Field(None, gt=0, le=1e6, description="minutes of training time "
                                           f"(default {DEFAULT_CHECKPOINT_MINUTES:g} when no other cadence is given)")
    every_steps: Optional[int] = Field(None, gt=0, le=MAX_STEPS)
    every_tokens: Optional[int] = Field(None, gt=0, le=MAX_TOKENS)
    keep_last: int = Field(2, gt=0, le=1_000_000)
    enabled: bool = Field(True, description="false: `checkpoint: off`, the stage never checkpoints")

    @property
    def minutes(self) -> Optional[float]:
        """The effective time cadence: every_minutes, else the default when nothing else is set."""
        if not self.enabled:
            return None
        if self.every_minutes is None and not (self.every_steps or self.every_tokens):
            return DEFAULT_CHECKPOINT_MINUTES
        return self.every_minutes

    def describe(self) -> str:
        if not self.enabled:
            return "off (a crash restarts the stage from step 0)"
        parts = [f"every {self.every_steps:,} steps" if self.every_steps else "",
                 f"every {self.every_tokens:,} tokens" if self.every_tokens else "",
                 f"every {self.minutes:g} min" + (" (default)" if self.every_minutes is None else "")
                 if self.minutes else ""]
        return ", ".join(p for p in parts if p) + f" and at the end, keep {self.keep_last}"


def _checkpoint_block(v):
    """`checkpoint: off` (YAML reads off/false as False) disables checkpoints; an empty block is the default."""
    if v is False or v == "off":
        return {"enabled": False}
    if v is None:
        return {}
    return v


class EvalSpec(_Strict):
    every_steps: int = Field(50, gt=0, le=MAX_STEPS)
    max_blocks: Union[Annotated[int, Field(gt=0, le=MAX_DIM)], Literal["all"]] = Field(
        16, description="validation blocks per domain per evaluation; `all`: the whole held-out set")

    @property
    def block_limit(self) -> int:
        """max_blocks as a number (`all`: no limit)."""
        return sys.maxsize if self.max_blocks == "all" else self.max_blocks


class LongDocsSpec(_Strict):
    """Long-document upsampling (Gao et al., "How to train long-context LMs"): within each source of the
    mixture, documents of at least `min_tokens` make up `share` of the source's tokens; source weights unchanged."""

    min_tokens: int = Field(gt=0, le=MAX_TOKENS, description="a document this long (in tokens, EOS included) counts as long")
    share: float = Field(gt=0, lt=1, description="share of each source's tokens that come from long documents")


class StageSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["cpt", "eeve", "anneal", "context_extension", "lora", "relora", "base"] = "cpt"
    description: str = ""
    start: Literal["previous", "init_from", "resume"] = Field(
        "previous", description="previous: weights of the stage before (or the base model); "
        "init_from: weights of `from`; resume: everything from `from`'s last checkpoint")
    from_: Optional[str] = Field(None, alias="from", description="a stage name or a checkpoint / HF directory")
    load_optimizer: bool = True
    load_lr_scheduler: bool = True
    mixture: Annotated[
        Union[Annotated[str, Tag("named")], Annotated[MixtureSpec, Tag("inline")]],
        Discriminator(lambda v: "named" if isinstance(v, str) else "inline"),
    ] = Field(description="the name of an entry in `mixtures`, or an inline mixture")
    trainable: TrainableSpec = Field(default_factory=TrainableSpec)
    lora: Optional[LoraSpec] = None
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    seq_len: int = Field(gt=0, le=MAX_DIM)
    rope_theta: Optional[float] = Field(None, gt=0, description="context extension: new RoPE base")
    long_docs: Optional[LongDocsSpec] = Field(None, description="upsample long documents within each source "
                                              "(implies keep_boundaries on the mixture's sources)")
    micro_batch_size: int = Field(1, gt=0, le=MAX_DIM)
    global_batch_size: int = Field(gt=0, le=MAX_DIM)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    zero_stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(_no_bool)] = 0
    offload: Literal["none", "cpu"] = "none"
    gradient_checkpointing: bool = False
    fused_loss: bool = Field(True, description="chunked head + cross-entropy that never holds the whole "
                             "batch's logits (engine/loss.py); the standard loss is used by itself when the "
                             "model's head does not allow it")
    checkpoint: Annotated[CheckpointSpec, BeforeValidator(_checkpoint_block)] = Field(
        default_factory=CheckpointSpec, description="default: every 30 minutes of training and at the end; "
        "`off`: never")
    eval: EvalSpec = Field(default_factory=EvalSpec)
    log_every: int = Field(1, gt=0, le=MAX_STEPS)
    nan_policy: Literal["stop", "skip"] = Field("stop", description="non-finite loss: stop the stage, or skip the batch")
    spike_factor: float = Field(3.0, gt=1, description="a loss >= spike_factor × the mean of the last "
                                "spike_window steps is recorded as a loss_spike warning")
    spike_window: int = Field(20, gt=0, le=1_000_000)
    max_steps: Optional[int] = Field(None, gt=0, le=MAX_STEPS, description="cap, mostly for smoke tests")

    @model_validator(mode="after")
    def _checks(self):
        if self.start in ("init_from", "resume") and not self.from_:
            raise ValueError(f"start: {self.start} needs `from:` (a stage name or a checkpoint directory)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")
        if self.kind == "relora" and (self.lora is None or self.lora.relora is None):
            raise ValueError("kind: relora needs `lora.relora` (merge_every, ...)")
        return self


# --------------------------------------------------------------------------- cluster


class NodeSpec(_Strict):
    host: str = Field(min_length=1, description="an ssh destination; ~/.ssh/config applies")
    user: Optional[str] = None
    port: Optional[int] = Field(None, gt=0, lt=65536)
    workdir: str = Field("~/cpt-tui", description="run directory on the node")
    python: str = Field("python3", description="the node's Python with the engine installed")
    processes: Optional[int] = Field(None, gt=0, le=1 << 16, description="default: cluster.processes_per_node (auto: the "
                                     "node's GPU count)")
    address: Optional[str] = Field(None, description="address other nodes reach this one at (default: host)")
    env: dict[str, str] = Field(default_factory=dict)


_OUTPUT = "cpt-tui sends the job's output to the stage's train.log (what it shows and tails); not settable"
_FIELD = "set it with the slurm block's own field `{}`"
# sbatch options that `slurm.extra` may not hold: cpt-tui sets them itself (an extra one would be overridden,
# or would undo what the batch script relies on), or the slurm block has a field for them.
_SBATCH_OWNED = {
    **dict.fromkeys(("--output", "-o", "--error", "-e", "--open-mode"), _OUTPUT),
    **dict.fromkeys(("--parsable", "--export"), "cpt-tui needs it as it sets it (job id; the stage's environment)"),
    "--signal": "cpt-tui asks for B:TERM before the time limit: set slurm.signal_grace",
    "--ntasks-per-node": "one task per node (accelerate launch starts cluster.processes_per_node processes)",
    **{k: _FIELD.format(f) for f, keys in (("nodes", ("--nodes", "-N")), ("partition", ("--partition", "-p")),
                                           ("account", ("--account", "-A")), ("qos", ("--qos", "-q")),
                                           ("time", ("--time", "-t")), ("gres", ("--gres",)),
                                           ("constraint", ("--constraint", "-C")),
                                           ("job_name", ("--job-name", "-J"))) for k in keys},
}


class SlurmSpec(_Strict):
    """`cluster.slurm`: one batch job per stage attempt (see cpt_tui/backends/slurm.py)."""
    nodes: int = Field(1, gt=0, description="nodes per stage job (one accelerate launch each)")
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = Field(None, description="per stage job, e.g. 24:00:00")
    gres: Optional[str] = Field(None, description="e.g. gpu:8")
    constraint: Optional[str] = None
    extra: list[str] = Field(default_factory=list, description="more sbatch options, e.g. --exclusive")
    login: Optional[str] = Field(None, description="null: sbatch/squeue/scancel here; or an ssh destination")
    python: str = Field("python3", description="the nodes' Python with the engine installed")
    signal_grace: int = Field(300, ge=0, description="seconds before the time limit: TERM (checkpoint), then requeue")
    job_name: Optional[str] = None

    @field_validator("extra")
    @classmethod
    def _extra(cls, v: list[str]) -> list[str]:
        for x in v:
            opt = x.split("=", 1)[0] if x.startswith("--") else x[:2] if x.startswith("-") else None
            if opt in _SBATCH_OWNED:
                raise ValueError(f"{x!r}: {_SBATCH_OWNED[opt]}")
        return v


class ClusterSpec(_Strict):
    kind: Literal["local", "ssh", "slurm"] = "local"
    processes_per_node: Union[Annotated[int, Field(gt=0, le=1 << 16)], Literal["auto"]] = Field(
        "auto", description="`auto`: the number of GPUs torch sees on the node (the preflight probe, "
        "engine/doctor.py), 1 on a node without CUDA")
    nodes: list[NodeSpec] = Field(default_factory=list)
    main_process_port: Optional[int] = Field(None, gt=0, lt=65536, description="default: a free port "
                                             "picked per stage attempt (local), 29500 (ssh), 10000 + the job id "
                                             "% 20000 (slurm)")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="decided on each node: `auto` trains on CUDA where torch sees it and refuses "
        "bf16/fp16 on a node without it (preflight); `cuda` refuses any node without CUDA; `cpu` always "
        "trains on the CPU (the tiny demos, tests)")
    stop_grace: float = Field(300.0, gt=0, description="seconds a stopped trainer has to write its "
                              "checkpoint before torchrun (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and the "
                              "node's guard SIGKILL it")
    env: dict[str, str] = Field(default_factory=dict, description="propagated to every node")
    ssh_options: list[str] = Field(default_factory=list)
    slurm: Optional[SlurmSpec] = None
    shared_fs: bool = Field(True, description="the run directory is shared with the nodes at the same path; "
                            "false (ssh): inputs are pushed to each node's workdir with rsync, events streamed "
                            "back over ssh, final/ pulled at the end of each stage")
    pull_checkpoints: bool = Field(False, description="shared_fs false: also pull the checkpoints back")
    gpu_memory_gb: Optional[float] = Field(None, gt=0, le=1 << 20, description="memory of each GPU, for the "
                                           "plan's memory verdict; default: the smallest GPU the preflight "
                                           "probe sees on the nodes (NVML / torch)")

    @model_validator(mode="after")
    def _nodes(self):
        if self.kind == "ssh" and not self.nodes:
            raise ValueError("kind: ssh needs at least one entry in `nodes`")
        if self.kind == "slurm" and self.slurm is None:
            self.slurm = SlurmSpec()
        if self.slurm is not None and self.kind != "slurm":
            raise ValueError("`slurm` is only used with kind: slurm")
        if self.gpu_memory_gb is not None and self.device == "cpu":
            raise ValueError("gpu_memory_gb is only used when training on GPUs (device is cpu)")
        if not self.shared_fs and self.kind != "ssh":
            raise ValueError("shared_fs: false needs kind: ssh (local and Slurm runs share the run directory)")
        return self


# --------------------------------------------------------------------------- benchmarks

# `include_path: builtin:cpt-local`: the local task set of engine/benchmarks (no download), written into the
# run directory when the run starts; its task names are known without lm-eval.
BUILTIN_TASKS = "builtin:cpt-local"
BASE_MODEL = "base-model"  # the benchmarks' name for the starting model (the reference column)


class BenchmarksSpec(_Strict):
    """lm-eval benchmarks, run in their own process on each selected stage's exported model after the
    stage ends, and once on the starting model (`reference`) before the first stage."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task, group or tag names")
    include_path: Optional[Union[str, list[str]]] = Field(
        None, description="folder(s) of task YAMLs (relative: to the working directory), or builtin:cpt-local")
    num_fewshot: Optional[Union[Annotated[int, Field(ge=0)], dict[str, Annotated[int, Field(ge=0)]]]] = Field(
        None, description="K for every task, or {task: K}; omitted: each task's own default")
    limit: Optional[Union[Annotated[int, Field(gt=0)], Annotated[float, Field(gt=0, lt=1)]]] = Field(
        None, description="examples per task (a fraction if < 1): smoke tests only")
    batch_size: Union[Annotated[int, Field(gt=0)], Literal["auto"]] = 8
    stages: Union[Literal["all", "none"], list[str]] = "all"
    reference: bool = Field(True, description="also evaluate the starting model (column base-model)")
    device: Optional[str] = Field(None, description="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: Optional[int] = Field(None, gt=0)
    bootstrap_iters: Optional[int] = Field(None, ge=0, description="stderr resamples (lm-eval's default 100000)")

    def include_paths(self) -> list[str]:
        p = self.include_path
        return [] if p is None else [p] if isinstance(p, str) else list(p)

    def stage_names(self, preset: "Preset") -> list[str]:
        """The stages evaluated, in run order."""
        if self.stages == "none":
            return []
        names = [s.name for s in preset.stages]
        return names if self.stages == "all" else [n for n in names if n in self.stages]


# --------------------------------------------------------------------------- trackers, notifications

# Tracker kind → (the module accelerate's tracker class imports, the cpt-tui extra that installs it).
TRACKER_EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                  "mlflow": ("mlflow", "mlflow")}


class TrackerSpec(_Strict):
    """One experiment tracker (engine/trackers.py): rank 0 logs every metric of the run to it, one
    tracker run per cpt-tui run. Checked at plan time: its library must be installed."""

    kind: Literal["tensorboard", "wandb", "mlflow"]
    dir: Optional[str] = Field(None, description="tensorboard: log directory (default RUN_DIR/tensorboard); "
                               "wandb: its files (default RUN_DIR)")
    project: str = Field("cpt", description="wandb project")
    entity: Optional[str] = Field(None, description="wandb entity (default: your W&B default)")
    mode: Optional[Literal["online", "offline", "disabled"]] = Field(None, description="wandb mode (default: "
                                                                      "WANDB_MODE, else online)")
    tracking_uri: Optional[str] = Field(None, description="mlflow (default: MLFLOW_TRACKING_URI, else a file "
                                        "store in RUN_DIR/mlruns)")
    experiment: str = Field("cpt", description="mlflow experiment name")

    @model_validator(mode="after")
    def _installed(self):
        import importlib.util

        module, extra = TRACKER_EXTRAS[self.kind]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"tracker {self.kind!r} needs the {module} package, which is not installed: "
                             f"pip install 'cpt-tui[{extra}]'")
        return self


# --------------------------------------------------------------------------- preset


class Preset(_Strict):
    name: str
    description: str = ""
    seed: int = Field(1234, ge=0, le=MAX_SEED)
    model: ModelSpec
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    vocabulary: Optional[VocabularySpec] = None
    sources: dict[str, SourceSpec] = Field(min_length=1)
    mixtures: dict[str, MixtureSpec] = Field(default_factory=dict, description="named mixtures stages can refer to")
    stages: list[StageSpec] = Field(min_length=1)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    benchmarks: Optional[BenchmarksSpec] = None
    trackers: list[TrackerSpec] = Field(default_factory=list, description="experiment trackers (engine/trackers.py)")
    notify: list[str] = Field(default_factory=list, description="apprise URLs notified of stage/run ends, NaN, "
                              "loss spikes, the restart limit (cpt_tui/notify.py)")

    @field_validator("notify")
    @classmethod
    def _apprise_installed(cls, v):
        import importlib.util

        if v and importlib.util.find_spec("apprise") is None:
            raise ValueError("notifications need apprise, which is not installed: pip install 'cpt-tui[notify]'")
        return v

    @model_validator(mode="after")
    def _references(self):
        # Cross-references are checked here so the error can carry a precise YAML path.
        for name, mix in self.mixtures.items():
            _check_weights(mix, self.sources, f"mixtures.{name}.weights")
        seen: set[str] = set()
        for i, st in enumerate(self.stages):
            if st.name in seen:
                raise _PathError(f"stages[{i}].name", f"duplicate stage name {st.name!r}")
            if isinstance(st.mixture, str):
                if st.mixture not in self.mixtures:
                    raise _PathError(f"stages[{i}].mixture", f"unknown mixture {st.mixture!r}; defined: {sorted(self.mixtures)}")
            else:
                _check_weights(st.mixture, self.sources, f"stages[{i}].mixture.weights")
            if st.from_ and st.start != "previous" and st.from_ in {s.name for s in self.stages} and st.from_ not in seen:
                raise _PathError(f"stages[{i}].from", f"stage {st.from_!r} does not run before {st.name!r}")
            seen.add(st.name)
        if self.tokenizer.train:
            for j, s in enumerate(self.tokenizer.train.sources):
                if s not in self.sources:
                    raise _PathError(f"tokenizer.train.sources[{j}]", f"unknown source {s!r}; defined: {sorted(self.sources)}")
        if self.vocabulary:
            for field in ("sources", "original_sources"):
                for j, s in enumerate(getattr(self.vocabulary, field)):
                    if s not in self.sources:
                        raise _PathError(f"vocabulary.{field}[{j}]", f"unknown source {s!r}; defined: {sorted(self.sources)}")
        if self.benchmarks and isinstance(self.benchmarks.stages, list):
            for j, s in enumerate(self.benchmarks.stages):
                if s not in seen:
                    raise _PathError(f"benchmarks.stages[{j}]", f"unknown stage {s!r}; stages: {sorted(seen)}")
        if self.benchmarks and BASE_MODEL in seen:
            raise _PathError("benchmarks", f"a stage is named {BASE_MODEL!r}, the benchmarks' name for the "
                             "starting model: rename the stage")
        if self.model.config is not None and self.tokenizer.path is None and self.tokenizer.train is None:
            raise _PathError("tokenizer", "a model built from `config` needs `tokenizer.path` or `tokenizer.train`")
        return self

    def mixture_of(self, stage: StageSpec) -> MixtureSpec:
        return self.mixtures[stage.mixture] if isinstance(stage.mixture, str) else stage.mixture

    def stage_index(self, name: str) -> int:
        for i, s in enumerate(self.stages):
            if s.name == name:
                return i
        raise KeyError(name)


def _check_weights(mix: MixtureSpec, sources: dict, where: str) -> None:
    for src in mix.weights:
        if src not in sources:
            raise _PathError(f"{where}.{src}", f"unknown source {src!r}; defined: {sorted(sources)}")


class _PathError(ValueError):
    """A cross-reference error that knows its YAML path (pydantic only knows the model's root)."""

    def __init__(self, path: str, msg: str):
        super().__init__(msg)
        self.yaml_path = path
        self.msg = msg


# --------------------------------------------------------------------------- loading


class PresetError(UserError):
    """Invalid preset: `str()` is a complete, user-facing message (file, YAML path, line, fix)."""

    def __init__(self, file: str | Path, problems: list[tuple[str, Optional[int], str]]):
        self.file = str(file)
        self.problems = problems  # (yaml path, 1-based line or None, message)
        lines = [f"{self.file}: invalid preset"]
        for path, line, msg in problems:
            lines.append(f"  {self.file}, line {line or '?'}, {path or '(top level)'}: {msg}")
        super().__init__("\n".join(lines))


def _yaml_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_of(root: Optional[yaml.Node], loc: tuple) -> Optional[int]:
    """Walk the composed YAML node tree along `loc`; the line of the deepest node reached."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    node, line = v, k.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


_HINTS = {
    "extra_forbidden": "unknown key: remove it or check its spelling",
    "missing": "required field is missing: add it",
}


def _split_path(path: str) -> tuple:
    parts: list[Any] = []
    for m in re.finditer(r"([^.\[\]]+)|\[(\d+)\]", path):
        parts.append(int(m.group(2)) if m.group(2) is not None else m.group(1))
    return tuple(parts)


MAX_YAML_NODES = 200_000  # a preset is a few hundred nodes; aliases expanding beyond this are a bomb
MAX_YAML_DEPTH = 64
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _PresetLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (naming both lines) and reads
    `1e-4` as the number YAML 1.2 says it is (YAML 1.1 needs a dot: `1.0e-4`)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for k, _ in node.value:
                if k.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: merged keys may be overridden, that is the point of a merge
                key = self.construct_object(k, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    raise _YamlProblem(k.start_mark.line + 1, f"a mapping key must be a plain value, got {k.id}")
                if first is not None:
                    raise _YamlProblem(k.start_mark.line + 1, f"duplicate key {key!r}: given at line {first} and "
                                       f"again at line {k.start_mark.line + 1}; keep one")
                seen[key] = k.start_mark.line + 1
        return super().construct_mapping(node, deep)


_PresetLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789"))


class _YamlProblem(Exception):
    def __init__(self, line: Optional[int], msg: str):
        super().__init__(msg)
        self.line, self.msg = line, msg


def _check_size(root: yaml.Node) -> None:
    """Bound what aliases expand to (a "billion laughs" preset must not hang the manager)."""
    memo: dict[int, int] = {}
    busy: set[int] = set()

    def size(n: yaml.Node, depth: int) -> int:
        if id(n) in memo:
            return memo[id(n)]
        if id(n) in busy:
            raise _YamlProblem(n.start_mark.line + 1, "an alias refers to the mapping or list that contains it")
        if depth > MAX_YAML_DEPTH:
            raise _YamlProblem(n.start_mark.line + 1, f"nested deeper than {MAX_YAML_DEPTH} levels")
        busy.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(c, depth + 1) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in n.value)
        else:
            total = 1
        busy.discard(id(n))
        if total > MAX_YAML_NODES:
            raise _YamlProblem(n.start_mark.line + 1, f"anchors and aliases expand to more than {MAX_YAML_NODES:,} "
                               "values; a preset is far smaller (an alias bomb?)")
        memo[id(n)] = total
        return total

    size(root, 0)


def load_yaml(text: str, file: str | Path = "<preset>") -> tuple[Any, Optional[yaml.Node]]:
    """(data, root node) of one YAML document, strictly: PresetError for invalid YAML, a duplicate key,
    an alias bomb or nesting too deep for the parser."""
    loader = _PresetLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_size(root)
        return loader.construct_document(root), root
    except _YamlProblem as e:
        raise PresetError(file, [("", e.line, e.msg)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        what = ", ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise PresetError(file, [("", line, f"not valid YAML: {what}; fix the syntax")]) from None
    except RecursionError:
        raise PresetError(file, [("", None, "not valid YAML: nested too deeply")]) from None
    finally:
        loader.dispose()


def parse_preset(text: str, file: str | Path = "<preset>") -> Preset:
    if "\x00" in text:
        raise PresetError(file, [("", text[:text.index("\x00")].count("\n") + 1,
                                  "not a text file (NUL bytes): is this the preset?")])
    data, root = load_yaml(text, file)
    if not isinstance(data, dict):
        raise PresetError(file, [("", 1, "a preset must be a YAML mapping (name:, model:, sources:, stages:, ...)")])
    try:
        return Preset.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            # pydantic adds union tags to the location; they are not part of the YAML path.
            loc = tuple(p for p in err["loc"] if p not in ("named", "inline"))
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, _PathError):
                loc = _split_path(ctx_err.yaml_path)
                msg = ctx_err.msg
            else:
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] in _HINTS:
                    msg = _HINTS[err["type"]]
                elif "input" in err and not isinstance(err["input"], (dict, list)):
                    msg = f"{msg} (got {err['input']!r})"
            problems.append((_yaml_path(loc), _line_of(root, loc), msg))
        # Deduplicate (union branches repeat the same problem).
        uniq = list(dict.fromkeys(problems))
        raise PresetError(file, uniq) from None


def load_preset(path: str | Path) -> Preset:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise PresetError(p, [("", None, f"cannot read the preset: {e.strerror}")]) from None
    except UnicodeDecodeError as e:
        raise PresetError(p, [("", None, f"not UTF-8 text ({e.reason} at byte {e.start})")]) from None
    return parse_preset(text, p)


def dump_preset(preset: Preset) -> str:
    data = preset.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    data = {"name": preset.name, **data}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def preset_error_at(file: str | Path, yaml_path: str, msg: str) -> PresetError:
    """A PresetError for a problem found after validation (plan checks, missing paths), with its line."""
    try:
        _, root = load_yaml(Path(file).read_text(encoding="utf-8"), file)
    except (OSError, UnicodeDecodeError, PresetError):
        root = None
    return PresetError(file, [(yaml_path, _line_of(root, _split_path(yaml_path)), msg)])
