"""A stage's checkpoints: when one is due, writing one atomically, finding and reading the latest.

    checkpoints/step-N/                     (written as .tmp-step-N, renamed when complete)
      trainer_state.json   format, step, position, schedule_start, world_size, deepspeed, tokens_per_source
      model.safetensors    the (unwrapped; with LoRA: peft-wrapped) model      } without DeepSpeed
      optimizer.pt         AdamW state, [scaler.pt] fp16 loss scaler           }
      config.json          a plain HF config (not with LoRA): `init_from` can point at a checkpoint
      engine/              DeepSpeed's own checkpoint (tag "engine")           } with DeepSpeed
      rng-rank{r}.pt       python / numpy / torch RNG states of each rank
    trainer_state.json is written last: a directory without it is never taken for a checkpoint
    (engine/layout.py names the paths and decides what is complete).

Writing is collective: every rank calls `save`, with the trainer's barriers in a fixed order
(rank 0 makes the directory | barrier | every rank writes and fsyncs what it wrote | barrier |
rank 0 commits | barrier). Every rank fsyncs: on several nodes, rank 0 cannot flush the others' files.

Reading: rank 0 alone picks the checkpoint to resume from and broadcasts its step (`choose`), so
every rank loads the same one (a rank deciding by itself could see another directory listing:
rank 0 deleting temporaries, NFS attribute caching).

Node-local directories (`node_local_dirs` in the stage JSON: the ssh backend's `shared_fs: false`):
no node sees another's disk, so each node's first process (LOCAL_RANK 0: the `dir_writer`) makes,
commits and prunes that node's copy of every checkpoint directory, and writes the replicated files
(weights, optimizer) there; each rank still writes its own rng-rank{r}.pt (and DeepSpeed partitions).
Pruning waits for every node's commit (a barrier), so a crash between two nodes' renames leaves the
previous step complete everywhere. `choose` then takes the newest step complete on EVERY node: each
writer's complete steps are gathered (one all_gather_object), intersected, and every rank computes
the same maximum. Every torch.load maps to the CPU: an optimizer
state saved from GPU 0 would otherwise land on GPU 0 in every rank (8 ranks × 8 B/param, OOM);
`load_state_dict` then moves it to each parameter's own device.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from engine.data.pack import fsync_dir, write_json_atomic
from engine.layout import TRAINER_STATE, StageLayout, checkpoint_step
from engine.spec import CheckpointSpec

CKPT_FORMAT = 1


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """This process's python / numpy / torch (and CUDA) RNG states."""
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def torch_load(path: Path):
    """torch.load of one of our checkpoint files, always onto the CPU (see the module docstring)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`. Other ranks may be writing into the same
    directory meanwhile (a shared run directory): an entry that vanishes between the listing and
    its fsync (a library's temporary file, renamed by its writer) is not this rank's, and is skipped."""
    dirs = []
    for d, _, files in os.walk(root):
        dirs.append(d)
        for name in files:
            try:
                with open(os.path.join(d, name), "rb") as f:
                    os.fsync(f.fileno())
            except FileNotFoundError:
                pass
    for d in dirs:
        try:
            fsync_dir(Path(d))
        except FileNotFoundError:
            pass


def read_state(path: Path) -> dict:
    """The trainer_state.json of a checkpoint."""
    return json.loads((path / TRAINER_STATE).read_text())


def _partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _load_partitioned(model, ckpt: Path, rank: int) -> None:
    """ZeRO-3 (model built under deepspeed.zero.Init: every parameter an empty placeholder): each
    parameter is gathered, rank 0 copies the checkpoint's tensor in, DeepSpeed re-partitions it
    (GatheredParameters, modifier_rank=0). Collective: every rank walks the same parameters; only
    rank 0 reads the file, tensor by tensor."""
    import deepspeed

    src = None
    if rank == 0:
        if (ckpt / "model.safetensors").exists():
            from safetensors import safe_open

            f = safe_open(str(ckpt / "model.safetensors"), framework="pt")
            src = {k: (lambda k=k: f.get_tensor(k)) for k in f.keys()}
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="engine")
            src = {k: (lambda v=v: v) for k, v in sd.items()}
    names, seen = [], set()
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            names.append((n, p))
    missing = []
    for n, p in names:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                if n in src:
                    p.data.copy_(src[n]().to(p.dtype))
                elif "lm_head" not in n:
                    missing.append(n)
    if missing:
        raise ValueError(f"{ckpt} does not fit this stage's model: missing {missing[:3]}")


def load_weights(model, ckpt: Path, rank: int = 0) -> None:
    """Weights of a checkpoint (ours, or DeepSpeed's) or an HF directory into `model`, exactly.
    Under ZeRO-3 collective (every rank calls it; see _load_partitioned)."""
    from safetensors.torch import load_model

    if _partitioned(model) and ((ckpt / "model.safetensors").exists() or (ckpt / "engine").is_dir()):
        _load_partitioned(model, ckpt, rank)
        return
    if (ckpt / "model.safetensors").exists():
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    elif (ckpt / "engine").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="engine")
        missing, unexpected = model.load_state_dict(sd, strict=False)
    else:
        raise FileNotFoundError(f"{ckpt}: no model.safetensors nor DeepSpeed checkpoint to resume from")
    if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied lm_head is stored once
        raise ValueError(f"{ckpt} does not fit this stage's model (LoRA on one side only?): "
                         f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")


# --------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """The checkpoints of one stage, for one process of its job.

    `dist` gives rank and barrier(); `ev` the event log (rank 0 writes); `deepspeed`: the model is a
    DeepSpeed engine that saves and loads its own (partitioned) module and optimizer state.
    What is saved is set by `bind` once the model and optimizer exist."""

    def __init__(self, layout: StageLayout, spec: CheckpointSpec, tokens_per_step: int, dist, ev,
                 deepspeed: bool, node_local: bool = False):
        self.layout, self.spec, self.tokens_per_step = layout, spec, tokens_per_step
        self.dist, self.ev, self.ds = dist, ev, deepspeed
        # Who makes, commits and prunes the checkpoint directories (and writes the replicated files):
        # rank 0 on a shared run directory; with node-local directories each node's first process.
        self.node_local = node_local
        self.dir_writer = dist.rank == 0 or (node_local and int(os.environ.get("LOCAL_RANK", "0")) == 0)
        self.model = self.unwrapped = self.optimizer = self.scaler = None
        self.hf_config = False
        # Time cadence: the default (no cadence in the preset) can be shortened by the tests only.
        test = os.environ.get("CPT_TEST_CHECKPOINT_MINUTES")
        self.minutes = spec.minutes
        if test and spec.every_minutes is None and self.minutes is not None:
            self.minutes = float(test)
        self._since = time.monotonic()  # training time since the last checkpoint (or the start)

    def bind(self, model, unwrapped, optimizer, scaler, hf_config: bool) -> None:
        """model: as wrapped (the DeepSpeed engine saves itself); unwrapped: the module whose
        weights go to model.safetensors; optimizer: the torch optimizer; hf_config: also save the
        model's config.json."""
        self.model, self.unwrapped, self.optimizer, self.scaler = model, unwrapped, optimizer, scaler
        self.hf_config = hf_config
        self._since = time.monotonic()  # the clock starts with training, not with the model's loading

    # ------------------------------------------------------------------ cadence
    @property
    def enabled(self) -> bool:
        return self.spec.enabled and bool(self.spec.every_steps or self.spec.every_tokens or self.minutes)

    def due(self, step: int, tokens: int, total_steps: int) -> bool:
        """Whether the step just done (1-based `step`, `tokens` consumed so far) ends with a
        checkpoint: every `every_steps`, on crossing a multiple of `every_tokens`, and at the end
        of the stage if the stage checkpoints at all."""
        s = self.spec
        if not s.enabled:
            return False
        if s.every_steps and step % s.every_steps == 0:
            return True
        if s.every_tokens and tokens // s.every_tokens != (tokens - self.tokens_per_step) // s.every_tokens:
            return True
        if step == total_steps:
            return self.enabled
        return bool(self.minutes) and self._time_due()

    def _time_due(self) -> bool:
        """Every `minutes` of training time. Rank 0's clock decides, summed over ranks (one scalar
        all-reduce): every rank takes the same decision, so the collective save never deadlocks."""
        due = self.dist.rank == 0 and time.monotonic() - self._since >= self.minutes * 60
        if self.dist.on and self.dist.world > 1:
            dev = next(self.unwrapped.parameters()).device if self.unwrapped is not None else "cpu"
            due = self.dist.sum([1.0 if due else 0.0], dev)[0] > 0
        return due

    # ------------------------------------------------------------------ finding
    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint of this stage, or None (as this process sees it)."""
        return self.layout.latest_checkpoint()

    def choose(self) -> Optional[Path]:
        """Collective: the checkpoint every rank resumes from: rank 0's latest, its step broadcast
        (after remove_partial, behind a barrier). Node-local directories: the newest step complete
        on every node (see the module docstring)."""
        self.remove_partial()
        self.dist.barrier()
        if self.node_local:
            step = self._common_step()
        else:
            mine = self.latest() if self.dist.rank == 0 else None
            step = self.dist.broadcast_int(checkpoint_step(mine) if mine is not None else -1)
        if step < 0:
            return None
        path = self.layout.checkpoint(step)
        if not (path / TRAINER_STATE).exists():
            raise RuntimeError(f"rank {self.dist.rank}: rank 0 resumes from {path}, which this process cannot "
                               "read (is the run directory shared by every node?)")
        return path

    def _common_step(self) -> int:
        """Node-local directories: the newest step every dir_writer has complete (-1: none)."""
        mine = [checkpoint_step(p) for p in self.layout.all_checkpoints() if (p / TRAINER_STATE).exists()] \
            if self.dir_writer else None
        lists = self.dist.gather_objects(mine) if getattr(self.dist, "world", 1) > 1 else [mine]
        common = None
        for steps in lists:
            if steps is not None:
                common = set(steps) if common is None else common & set(steps)
        return max(common) if common else -1

    def remove_partial(self) -> None:
        """The directory writer(s): delete checkpoints interrupted mid-write (.tmp-step-N)."""
        if self.dir_writer:
            for stale in self.layout.tmp_checkpoints():
                shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ writing
    def save(self, step: int, tokens: int, state: Callable[[], dict], rng: Optional[dict] = None) -> Path:
        """Collective: write checkpoints/step-`step`. `state()` (called on the directory writers
        only) gives the trainer_state.json fields besides `format`. Prunes to the newest `keep_last`. `rng`: this
        rank's RNG states to record (default: now; a stop mid-step gives those at the step's start)."""
        rank, final, tmp = self.dist.rank, self.layout.checkpoint(step), self.layout.tmp_checkpoint(step)
        writer = self.dir_writer
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        if self.ds:
            self.model.save_checkpoint(str(tmp), tag="engine")  # collective: every rank writes its partition
        elif writer:  # (node-local directories: the replicated weights and optimizer state on every node)
            from safetensors.torch import save_model

            save_model(self.unwrapped, str(tmp / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            if self.scaler is not None:
                torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
            if self.hf_config:
                self.unwrapped.config.save_pretrained(str(tmp))
        torch.save(rng if rng is not None else rng_state(), tmp / f"rng-rank{rank}.pt")
        if not writer:
            fsync_tree(tmp)  # this rank's files (on its node: nobody else can flush them)
        self.dist.barrier()
        if writer:
            write_json_atomic(tmp / TRAINER_STATE, {"format": CKPT_FORMAT, **state()})
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.layout.checkpoints)
        if self.node_local:
            self.dist.barrier()  # every node committed before any prunes: the previous step stays common
        if writer:
            for old in self.layout.all_checkpoints()[: -self.spec.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        if rank == 0:
            self.ev.emit("checkpoint", step=step, path=str(final), tokens=tokens)
        self.dist.barrier()
        self._since = time.monotonic()
        return final

    # ------------------------------------------------------------------ reading
    def load_model(self, path: Path) -> None:
        """The weights of one of our own checkpoints into the bound model (without DeepSpeed; with
        it, load_optimizer restores module and optimizer together)."""
        if not self.ds:
            from safetensors.torch import load_model

            load_model(self.unwrapped, str(path / "model.safetensors"))

    def load_optimizer(self, path: Path, own: bool) -> None:
        """Optimizer (and loss scaler) state. `own`: a checkpoint of this stage, which must fit;
        another stage's that does not fit is a warning and a fresh optimizer."""
        if self.ds and (path / "engine").is_dir():  # DeepSpeed restores module and optimizer together
            self.model.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        elif not self.ds and (path / "optimizer.pt").exists():
            try:
                self.optimizer.load_state_dict(torch_load(path / "optimizer.pt"))
            except ValueError as e:
                if own:
                    raise
                self.ev.emit("warning", kind="config", message=f"optimizer state of {path} does not fit this "
                             f"stage's parameters ({e}); starting with a fresh optimizer")
            if (path / "scaler.pt").exists() and self.scaler is not None:
                self.scaler.load_state_dict(torch_load(path / "scaler.pt"))
        elif own:
            raise RuntimeError(f"{path}: checkpoint written {'without' if self.ds else 'with'} DeepSpeed; "
                               "restart the stage with the same zero_stage")
        else:
            self.ev.emit("warning", kind="config", message=f"{path} holds no optimizer state usable "
                         f"{'with' if self.ds else 'without'} DeepSpeed; starting with a fresh optimizer")

    def load_rng(self, path: Path) -> None:
        """This rank's RNG states, if the checkpoint has them."""
        rng = path / f"rng-rank{self.dist.rank}.pt"
        if rng.exists():
            set_rng_state(torch_load(rng))
