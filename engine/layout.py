"""The run directory's layout: the one place that names its files. Imported by the engine (on GPU
nodes) and by the manager and UI, so it imports nothing heavy (no torch).

    RUN_DIR/
      preset.yaml              the preset as started (the supervisor reads this copy)
      prepared.json            what preparation produced (tokenizer, model, sources); written last
      prepare/events.jsonl     preparation progress (stream "prepare")
      prepare.log / .pid / .exit   the preparation process: output, adoption record, exit status
      supervisor.log           the detached supervisor's output
      vocab/                   the extended tokenizer and vocab_report.json (a `vocabulary` block)
      base_model/              a model built from `model.config` (no `model.path`)
      cache/                   preparation's default cache (tokenizers, sources) without --cache
      deepspeed.STAGE.json     the DeepSpeed config of a ZeRO stage
      stages/STAGE/
        stage.json             the trainer's input (engine/plan.py:stage_config)
        events.jsonl           the trainer's events (rank 0)
        train.log              every process's output
        exit.ATTEMPT.I         a local keeper's exit status
        slurm.ATTEMPT.sbatch / .exit / .signalled   a Slurm job: its script, exit status, pre-timeout TERM seen
        checkpoints/step-N/    complete checkpoints (trainer_state.json written last)
        checkpoints/.tmp-step-N/   one being written
        final/                 the exported Hugging Face model (.tmp-final while written)
        stage.node-I.json      shared_fs false: the stage JSON as node I sees it (node paths)
        .push/node-I/          shared_fs false: what is pushed to node I (links into the inputs)
      benchmarks/tasks/        the local lm-eval task set (include_path: builtin:cpt-local)
      benchmarks/TARGET/       one benchmark evaluation (TARGET: a stage name, or base-model)
        results.json           engine/evaluate.py's RESULTS.json
        eval.log               its output
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence = complete
VOCAB_REPORT = "vocab_report.json"  # beside an extended tokenizer + model (RUN_DIR/vocab, its cache)
_STEP_PREFIX = "step-"
_TMP_STEP_PREFIX = ".tmp-step-"

PathLike = Union[str, Path]


def checkpoint_step(path: PathLike) -> int:
    """The step of a `step-N` (or `.tmp-step-N`) checkpoint directory."""
    return int(Path(path).name.rsplit("-", 1)[1])


def complete_checkpoints(root: PathLike) -> list[Path]:
    """The complete checkpoints under a checkpoints/ directory, oldest first."""
    done = [p for p in Path(root).glob(_STEP_PREFIX + "*") if (p / TRAINER_STATE).exists()]
    return sorted(done, key=checkpoint_step)


def latest_checkpoint(root: PathLike) -> Optional[Path]:
    """The newest complete checkpoint under a checkpoints/ directory, or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


class StageLayout:
    """RUN_DIR/stages/NAME."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    @property
    def name(self) -> str:
        return self.root.name

    config = property(lambda self: self.root / "stage.json")
    events = property(lambda self: self.root / "events.jsonl")
    log = property(lambda self: self.root / "train.log")
    checkpoints = property(lambda self: self.root / "checkpoints")
    final = property(lambda self: self.root / "final")
    tmp_final = property(lambda self: self.root / ".tmp-final")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{_STEP_PREFIX}{step}"

    def tmp_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{_TMP_STEP_PREFIX}{step}"

    def tmp_checkpoints(self) -> list[Path]:
        return list(self.checkpoints.glob(_TMP_STEP_PREFIX + "*"))

    def all_checkpoints(self) -> list[Path]:
        """Every `step-N` directory, complete or not, oldest first (for pruning)."""
        return sorted(self.checkpoints.glob(_STEP_PREFIX + "*"), key=checkpoint_step)

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.checkpoints)

    def latest_checkpoint(self) -> Optional[Path]:
        return latest_checkpoint(self.checkpoints)

    def exit_file(self, attempt: int, index: int) -> Path:
        return self.root / f"exit.{attempt}.{index}"

    def sbatch_script(self, attempt: int) -> Path:
        """The generated batch script of a Slurm stage attempt."""
        return self.root / f"slurm.{attempt}.sbatch"

    def job_exit(self, attempt: int) -> Path:
        """A Slurm batch job's exit status, written by its script (survives Slurm forgetting the job)."""
        return self.root / f"slurm.{attempt}.exit"

    def job_signalled(self, attempt: int) -> Path:
        """Present when the batch shell got Slurm's pre-time-limit / preemption TERM."""
        return self.root / f"slurm.{attempt}.signalled"

    def node_config(self, index: int) -> Path:
        """shared_fs false: the stage JSON with node I's paths (pushed to the node as its stage.json)."""
        return self.root / f"stage.node-{index}.json"

    def push_dir(self, index: int) -> Path:
        """shared_fs false: node I's push tree (the node paths, linking to the inputs here)."""
        return self.root / ".push" / f"node-{index}"


class BenchmarkLayout:
    """RUN_DIR/benchmarks/TARGET."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    results = property(lambda self: self.root / "results.json")
    log = property(lambda self: self.root / "eval.log")
    exit_file = property(lambda self: self.root / "eval.exit")


class RunLayout:
    """RUN_DIR."""

    def __init__(self, root: PathLike):
        self.root = Path(root)

    preset = property(lambda self: self.root / "preset.yaml")
    prepared = property(lambda self: self.root / "prepared.json")
    prepare_dir = property(lambda self: self.root / "prepare")
    prepare_events = property(lambda self: self.root / "prepare" / "events.jsonl")
    prepare_log = property(lambda self: self.root / "prepare.log")
    prepare_pid = property(lambda self: self.root / "prepare.pid")
    prepare_exit = property(lambda self: self.root / "prepare.exit")
    supervisor_log = property(lambda self: self.root / "supervisor.log")
    vocab = property(lambda self: self.root / "vocab")
    vocab_report = property(lambda self: self.root / "vocab" / VOCAB_REPORT)
    base_model = property(lambda self: self.root / "base_model")
    default_cache = property(lambda self: self.root / "cache")

    def stage(self, name: str) -> StageLayout:
        return StageLayout(self.root / "stages" / name)

    benchmark_tasks = property(lambda self: self.root / "benchmarks" / "tasks")

    def benchmark(self, target: str) -> "BenchmarkLayout":
        return BenchmarkLayout(self.root / "benchmarks" / target)

    def deepspeed_config(self, stage_name: str) -> Path:
        return self.root / f"deepspeed.{stage_name}.json"

    def logs(self, stage_names: list[str]) -> list[Path]:
        """The run's process logs in reading order: supervisor, preparation, each stage's trainer."""
        return [self.supervisor_log, self.prepare_log] + [self.stage(n).log for n in stage_names]
