"""The trainer: one stage, run as `accelerate launch ... -m engine.train STAGE.json`.

A custom accelerate loop (not the HF Trainer): the engine owns the sample order (engine.data.mixture)
so that the position in a stage is one integer and resume is exact. Writes `events.jsonl` (schema in
engine.events), atomic checkpoints under `checkpoints/step-N`, and the final model in Hugging Face
format under `final/` (LoRA: merged, plus the adapter in `final/adapter/`).

Processes: torch.distributed is the source of truth for rank and world size. Under DeepSpeed on
CPU accelerate reports one process (PITFALLS 2), so the engine shards batches, reduces metrics,
saves RNG states and synchronises by itself, never through accelerate's process helpers.
With DeepSpeed (`accelerate launch --use_deepspeed --deepspeed_config_file ...`, the plugin comes
from the launcher's environment) the DeepSpeed engine does gradient accumulation, clipping and
loss scaling; the loop calls its backward/step once per micro-batch.

Checkpoints: engine/checkpoint.py (Checkpointer); throughput and spikes: engine/metrics.py;
test-only fault injection (CPT_FAULT_*): engine/faults.py.

Device (issue 20): decided here, on the node, never by the launcher: CUDA where torch sees it. The
stage config's `device` (cluster.device) is `auto` (then a bf16/fp16 stage on a node without CUDA
is refused: it would silently train on the CPU), `cuda` (refused without CUDA) or `cpu`. A refusal
is a failed status naming the node, exit code 2. The running event states the device.

Stopping: SIGTERM sets a flag that every rank agrees on (a sum over ranks) before each micro-batch
and at the end of each step. Agreed at a step's end: checkpoint that step. Agreed in the middle of
a step (a long accumulation step would outlast torchrun's and the guard's kill delays): the partial
step is dropped and the checkpoint is the state as of the last completed step (weights, optimizer,
data position, and the RNG states taken at the dropped step's start), so resume stays bit-exact.

Exit codes: 0 done, 1 failed, 2 refused (a user error: device, dtype), 75 stopped by SIGTERM after
a checkpoint (resumable).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import (CKPT_FORMAT, Checkpointer, load_weights, read_state,  # noqa: F401  (CKPT_FORMAT: API)
                               rng_state)
from engine.data.mixture import block_order, plan_mixture
from engine.data.pack import open_tokens
from engine.errors import UserError
from engine.events import EventWriter
from engine.faults import Faults
from engine.layout import StageLayout
from engine.loss import fused_head_unsupported, install_head, linear_cross_entropy, restore_head, shifted_targets
from engine.metrics import SpikeWatch, StepTimer
from engine.rules import check_new_rows, check_stage_processes
from engine.schedule import Schedule
from engine.spec import MIXED_PRECISION, MixtureSpec, StageSpec
from engine.trackers import with_trackers
from engine.trainable import RowGuard, apply_patterns, apply_trainable, param_groups

EXIT_STOPPED = 75
EXIT_REFUSED = 2


class DeviceError(UserError):
    """The node cannot train the stage as asked (no CUDA, a dtype that cannot train there)."""


class StageData:
    """Blocks of the stage's mixture, read straight from the memory-mapped token streams."""

    def __init__(self, cfg: dict, stage: StageSpec, mix: MixtureSpec, seed: int):
        self.seq_len = stage.seq_len
        names = list(mix.weights)
        self.streams = [open_tokens(cfg["sources"][n]["dir"], "train") for n in names]
        self.plan = plan_mixture(mix, {n: cfg["sources"][n]["train_tokens"] for n in names}, stage.seq_len)
        self.labels, self.index = block_order(self.plan, seed, mix.shuffle)
        self.names = names

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, positions: range) -> torch.Tensor:
        L = self.seq_len
        rows = [self.streams[self.labels[k]][self.index[k] * L:(self.index[k] + 1) * L] for k in positions]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def tokens_per_source(self, upto: int) -> dict[str, int]:
        counts = np.bincount(self.labels[:upto], minlength=len(self.names)) * self.seq_len
        return {n: int(c) for n, c in zip(self.names, counts)}


def val_blocks(cfg: dict, seq_len: int, max_blocks: int) -> dict[str, torch.Tensor]:
    """Per validation domain, up to `max_blocks` blocks from the held-out tokens of its sources."""
    by_domain: dict[str, list[np.ndarray]] = {}
    for name, src in cfg["sources"].items():
        if src.get("val_tokens", 0) >= seq_len:
            toks = open_tokens(src["dir"], "val")
            n = min(len(toks) // seq_len, max_blocks)
            by_domain.setdefault(src["domain"], []).append(np.asarray(toks[: n * seq_len]).reshape(n, seq_len))
    return {d: torch.from_numpy(np.concatenate(v)[:max_blocks].astype(np.int64)) for d, v in by_domain.items()}


# --------------------------------------------------------------------------- processes


class Dist:
    """Rank, world size and the few collectives the loop needs, straight from torch.distributed."""

    def __init__(self, device=None):
        d = torch.distributed
        self.on = d.is_available() and d.is_initialized()
        self.rank = d.get_rank() if self.on else 0
        self.world = d.get_world_size() if self.on else 1
        self.device = device  # where collective tensors live (NCCL: the rank's GPU)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank."""
        if not (self.on and self.world > 1):
            return value
        t = torch.tensor([value if self.rank == 0 else 0], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(t, 0)
        return int(t.item())

    def barrier(self) -> None:
        if self.on and self.world > 1:
            torch.distributed.barrier()

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not (self.on and self.world > 1):
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float], device) -> list[float]:
        """Element-wise sum over ranks, in one collective (a no-op for one process)."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.on and self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()


# --------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: dict):
        """Processes, the event log, then the checks of the stage against them. A failure after the
        event log is open is recorded there (status failed) before it propagates."""
        from accelerate import Accelerator

        self.cfg = cfg
        self.stage = st = StageSpec.model_validate(cfg["stage"])
        self.mix = MixtureSpec.model_validate(cfg["mixture"])
        self.layout = StageLayout(cfg["out_dir"])
        self.ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        # cluster.device; None: a stage config written before it existed (no device checks)
        self.device_pref = cfg.get("device")
        if self.device_pref == "cpu" and self.ds:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick CUDA by itself
        cuda = torch.cuda.is_available() and self.device_pref != "cpu"
        self.refusal = self._device_refusal(cuda)
        self.notes: list[tuple[str, str]] = []
        mp = MIXED_PRECISION[st.precision]
        if not cuda and mp == "fp16":  # fp16 autocast and loss scaling need a GPU; bf16 works on CPU
            mp = "no"
            self.notes.append(("precision", "fp16 requested but no GPU: training in fp32 (use bf16 on CPU)"))
        if not cuda and self.device_pref is None and st.precision == "bf16":
            self.notes.append(("device", f"node {socket.gethostname()}: torch sees no CUDA: training bf16 on the CPU"))
        # DeepSpeed on CPU only engages with cpu=False (cpu=True silently falls back to DDP).
        self.accelerator = Accelerator(cpu=not cuda and not self.ds, mixed_precision=mp)
        if self.ds and not cuda:  # the launcher cannot know the node has no GPU: no pinned memory here
            zero = self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            for k in ("offload_optimizer", "offload_param"):
                if isinstance(zero.get(k), dict):
                    zero[k]["pin_memory"] = False
        self.dist = Dist(self.accelerator.device)
        self.rank, self.world = self.dist.rank, self.dist.world
        self.ev = EventWriter(self.layout.events, st.name, enabled=self.rank == 0)
        self.ev = with_trackers(self.ev, cfg, self.rank)  # metric/eval events also go to the preset's trackers
        try:
            if self.refusal:
                raise DeviceError(self.refusal)
            self._configure()
        except Exception as e:
            self.fail(e)
            raise

    def _device_refusal(self, cuda: bool) -> str | None:
        """Why this node must not train the stage (cluster.device vs what torch sees), or None."""
        if cuda or self.device_pref in (None, "cpu"):
            return None
        host = socket.gethostname()
        why = (f"node {host}: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device "
               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        if self.device_pref == "cuda":
            return f"{why}; cluster.device is cuda"
        if self.stage.precision in ("bf16", "fp16"):
            return (f"{why}, and the stage trains in {self.stage.precision}: it would train on the CPU. Fix the "
                    "node's torch/driver, or set cluster.device: cpu to train on the CPU")
        return None

    def fail(self, e: BaseException) -> None:
        """Record an exception as the stage's end (status failed) and close the event log."""
        code = EXIT_REFUSED if isinstance(e, UserError) else 1
        self.ev.emit("status", state="failed", reason=f"{type(e).__name__}: {e}", exit_code=code)
        self.ev.close()

    def _configure(self) -> None:
        from accelerate.utils import set_seed

        cfg, st = self.cfg, self.stage
        self._check_processes()
        # engine/rules.py: the same rules `cpt-tui plan` checked, now with the processes we got
        self.accum = check_stage_processes(st, self.world, self.ds)
        check_new_rows(st, cfg.get("old_vocab_size"), False)
        self.relora = st.lora.relora if st.lora else None
        self.seed = self.mix.seed if self.mix.seed is not None else cfg["seed"] + cfg["stage_index"]
        set_seed(cfg["seed"] + cfg["stage_index"])
        self.stop_requested = False
        self.faults = Faults()  # test-only (CPT_FAULT_*): nothing happens without them
        self.ckpt = Checkpointer(self.layout, st.checkpoint, st.global_batch_size * st.seq_len, self.dist, self.ev,
                                 deepspeed=self.ds, node_local=bool(cfg.get("node_local_dirs")))

    def _check_processes(self) -> None:
        acc = self.accelerator
        if self.ds:
            from accelerate.utils import DistributedType

            if acc.distributed_type != DistributedType.DEEPSPEED:
                raise RuntimeError("launched with --use_deepspeed but accelerate did not enable DeepSpeed")
            ds_cfg = acc.state.deepspeed_plugin.deepspeed_config
            want = self.stage.global_batch_size
            if ds_cfg.get("train_batch_size") not in (want, "auto"):
                raise ValueError(f"the DeepSpeed config's train_batch_size {ds_cfg.get('train_batch_size')} is not "
                                 f"the stage's global_batch_size {want} (world size {self.world})")
        elif acc.num_processes != self.world:
            raise RuntimeError(f"accelerate sees {acc.num_processes} processes, torch.distributed {self.world}")

    # ------------------------------------------------------------------ setup
    def build(self, weights_from: Path | None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg, st = self.cfg, self.stage
        self.tokenizer = AutoTokenizer.from_pretrained(cfg["tokenizer_dir"])
        mconf = AutoConfig.from_pretrained(cfg["model_dir"])
        _extend_context(mconf, st.seq_len, st.rope_theta)
        # model.dtype: every rank loads in it (a bf16 8B model: 16 GB per rank, not 32 GB of fp32)
        model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], config=mconf, dtype=self.model_dtype,
                                                     attn_implementation="sdpa")
        if st.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        old_vocab = st.trainable.old_vocab_size or cfg.get("old_vocab_size")
        self.full_rank: list[torch.nn.Parameter] = []
        if st.lora:
            from engine.lora import apply_lora, lora_params

            self.guard = RowGuard()  # LoRA stages: the base is frozen, `trainable` rows do not apply
            if self.relora and self.relora.warm_start_steps:
                apply_trainable(model, st.trainable, old_vocab)
                self.full_rank = [p for p in model.parameters() if p.requires_grad]
            model = apply_lora(model, st.lora)
            apply_patterns(model, st.trainable.include, st.trainable.exclude)
            for p in self.full_rank:  # in the optimizer from the start; set_relora_phase picks who learns
                p.requires_grad_(True)
            self.adapters = lora_params(model)
        else:
            self.guard = apply_trainable(model, st.trainable, old_vocab)
        if weights_from is not None:  # `start: resume` from another stage: its weights, before wrapping
            load_weights(model, weights_from, rank=self.rank)  # ZeRO-3: collective, gathered per parameter
        self._check_dtype(model)
        # The chunked loss (engine/loss.py) when the head allows it: never the whole batch's logits.
        self.loss_kind = "standard"
        self.head = None
        if st.fused_loss:
            why = fused_head_unsupported(model, zero3=self.ds and st.zero_stage == 3)
            if why is None:
                self.head, self.loss_kind = install_head(model), "fused"
            else:
                self.loss_kind = f"standard ({why})"
        o = st.optimizer
        self.opt = _adamw(param_groups(model, o.weight_decay, self.guard), lr=st.schedule.lr, betas=o.betas,
                          eps=o.eps, fused=not self.ds)  # DeepSpeed wraps the optimizer itself
        self.data = StageData(cfg, st, self.mix, self.seed)
        self.total_steps = len(self.data) // st.global_batch_size
        if st.max_steps:
            self.total_steps = min(self.total_steps, st.max_steps)
        if self.total_steps <= 0:
            raise ValueError("the stage has 0 steps: its token budget is smaller than one global batch")
        self.schedule = Schedule(st.schedule, self.total_steps, restarts=self._restarts(),
                                 rewarmup=self.relora.rewarmup_steps if self.relora else 0)
        self.model, self.optimizer = self.accelerator.prepare(model, self.opt)
        self.unwrapped = self.model.module if self.ds else self.accelerator.unwrap_model(self.model)
        # A plain HF config (not with LoRA) goes into checkpoints: `init_from` can point at one.
        self.ckpt.bind(self.model, self.unwrapped, self.opt, self.accelerator.scaler, hf_config=not st.lora)
        self.val = val_blocks(cfg, st.seq_len, st.eval.block_limit)
        self.step, self.position = 0, 0

    @property
    def model_dtype(self) -> torch.dtype:
        return getattr(torch, self.cfg.get("model_dtype") or "float32")

    def _check_dtype(self, model) -> None:
        """Trainable 16-bit weights without DeepSpeed have no fp32 master copy: fp16 ones cannot
        train at all (GradScaler refuses fp16 gradients), bf16 ones train in pure bf16 (a warning)."""
        if self.ds:
            return  # DeepSpeed keeps fp32 master weights in its optimizer
        half = {p.dtype for p in model.parameters() if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)}
        if torch.float16 in half:
            raise DeviceError("model.dtype float16 with trainable fp16 weights and no DeepSpeed: set model.dtype "
                              "float32 (precision fp16 still computes in fp16), use LoRA, or zero_stage >= 1")
        if torch.bfloat16 in half:
            self.ev.emit("warning", kind="precision", message="model.dtype bfloat16 without DeepSpeed: AdamW updates "
                         "bf16 weights directly (no fp32 master copy); use model.dtype float32 for mixed precision")

    def _restarts(self) -> list[int]:
        """Steps after which ReLoRA restarts: the end of the warm start, then every merge."""
        r = self.relora
        if not r:
            return []
        first = [r.warm_start_steps] if r.warm_start_steps else []
        return first + list(range(r.warm_start_steps + r.merge_every, self.total_steps, r.merge_every))

    # ------------------------------------------------------------------ state
    def resume(self) -> tuple[Path | None, Path | None]:
        """Build the model, from this stage's latest checkpoint (a restart) or else the checkpoint
        of `start: resume`. Returns (own checkpoint, other stage's checkpoint): at most one is set."""
        own = self.ckpt.choose()  # rank 0's latest (after removing partial ones), the same on every rank
        other = Path(self.cfg["resume_from"]) if own is None and self.cfg.get("resume_from") else None
        self.build(weights_from=other)
        if own is not None:
            self.load_checkpoint(own, own=True)
        elif other is not None:
            self.load_checkpoint(other, own=False)
        if self.relora:
            self._set_phase()
        return own, other

    def save_checkpoint(self, rng: dict | None = None) -> None:
        self.saved_step = self.step
        self.ckpt.save(self.step, self.tokens, rng=rng, state=lambda: {
            "step": self.step, "position": self.position, "schedule_start": self.schedule.start,
            "world_size": self.world, "deepspeed": self.ds,
            "tokens_per_source": self.data.tokens_per_source(self.position)})

    def load_checkpoint(self, path: Path, own: bool) -> None:
        """Own checkpoint (a restart of this stage): everything. Another stage's (`start: resume`):
        weights were loaded in build(); optimizer / schedule per load_optimizer / load_lr_scheduler.
        The step and data position are kept in both cases."""
        st = self.stage
        state = read_state(path)
        if own:
            self.ckpt.load_model(path)
        if own or st.load_optimizer:
            self.ckpt.load_optimizer(path, own)
        if own:
            self.ckpt.load_rng(path)
        self.step, self.position = state["step"], state["position"]
        if own:
            self.saved_step = self.step
        self.schedule.start = state.get("schedule_start", 0) if (own or st.load_lr_scheduler) else self.step
        if self.step >= self.total_steps and not own:
            raise ValueError(f"resumed at step {self.step}, but this stage ends at step {self.total_steps} "
                             "(steps count from the start of the resumed run, as nanotron's train_steps)")
        if self.position + (self.total_steps - self.step) * st.global_batch_size > len(self.data):
            raise ValueError(f"resumed at block {self.position} of {len(self.data)}: this stage's mixture has too "
                             "few blocks left for its steps; raise its budget")

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss per predicted token and domain. Blocks are sharded over ranks, padded so that
        every rank runs the same number of forwards (ZeRO-3 gathers weights collectively)."""
        self.model.eval()
        out = {}
        mb = self.stage.micro_batch_size
        dev = self.accelerator.device
        for domain, blocks in self.val.items():
            mine = blocks[self.rank::self.world]
            per_rank = math.ceil(len(blocks) / self.world)
            total, n = 0.0, 0
            for i in range(0, per_rank, mb):
                x = (mine[i:i + mb] if i < len(mine) else blocks[:1]).to(dev)
                real = max(0, min(mb, len(mine) - i))
                with self.accelerator.autocast():
                    loss = self.lm_loss(x)
                if real:
                    k = real * (x.shape[1] - 1)  # predicted positions of the real blocks
                    total += loss.float().item() * k
                    n += k
            total, n = self.dist.sum([total, float(n)], dev)
            out[domain] = total / n
            self.ev.emit("eval", step=self.step, tokens=self.tokens, domain=domain, loss=out[domain],
                         blocks=len(blocks))
        self.model.train()
        return out

    # ------------------------------------------------------------------ loop
    def lm_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of the blocks `x` (through the wrapped model: DDP/DeepSpeed hooks run)."""
        if self.head is None:
            return self.model(input_ids=x, labels=x, use_cache=False).loss
        hidden = self.model(input_ids=x, use_cache=False).logits  # the HiddenHead passes hidden states
        return linear_cross_entropy(hidden, self.head.weight, shifted_targets(x))

    @property
    def tokens(self) -> int:
        return self.position * self.stage.seq_len

    def run(self) -> int:
        st = self.stage
        self.start()
        while self.step < self.total_steps:
            lr = self.schedule.lr(self.step)
            done = self.train_step(lr)
            if done is None:  # stopped in the middle of the step: it is dropped
                return self.stopped(rng=self.step_rng)
            loss, grad_norm, stop = done
            self.step += 1
            self.position += st.global_batch_size
            if loss is None and (st.nan_policy == "stop" or self.ds):
                self.ev.emit("status", state="failed", step=self.step, exit_code=1,
                             reason=f"non-finite loss at step {self.step}")
                return 1
            self.watch(loss)
            if self.relora:
                self._relora_after_step()
            if loss is not None and self._every(st.log_every):
                self.log_metrics(loss, lr, grad_norm)
            if self.val and self._every(st.eval.every_steps):
                self.evaluate()
            if self.ckpt.due(self.step, self.tokens, self.total_steps):
                self.save_checkpoint()
            if stop:
                return self.stopped()
        self.export()
        self.ev.emit("status", state="done", step=self.step, tokens=self.tokens, export=str(self.layout.final),
                     exit_code=0)
        return 0

    def stopped(self, rng: dict | None = None) -> int:
        """All ranks agreed on SIGTERM: checkpoint the last completed step (unless it has one), exit 75.
        `rng`: the RNG states as of that step's end (a dropped partial step consumed some)."""
        if self.saved_step != self.step:
            self.save_checkpoint(rng=rng)
        self.ev.emit("status", state="stopped", step=self.step, reason="SIGTERM", exit_code=EXIT_STOPPED)
        return EXIT_STOPPED

    def start(self) -> None:
        """SIGTERM handling, status starting, resume (or a fresh model), status running, the
        baseline evaluation of a fresh start, and the measurements of the loop."""
        st = self.stage
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.ev.emit("status", state="starting", world_size=self.world, grad_accum=self.accum,
                     threads=torch.get_num_threads())
        for kind, msg in self.notes:
            self.ev.emit("warning", kind=kind, message=msg)
        self.saved_step = -1
        own, other = self.resume()
        if not self.ds:  # (DeepSpeed runs the optimizer step itself: restore is never called there)
            self.guard.snapshot()  # the protected rows as loaded, on their device
        dev = self.accelerator.device
        self.ev.emit("status", state="running", step=self.step, total_steps=self.total_steps, loss=self.loss_kind,
                     resumed_from=str(own or other) if (own or other) else None,
                     device=f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev),
                     dtype=str(self.model_dtype).removeprefix("torch."))
        if own is None and self.val:  # not a restart (a fresh start, or `start: resume`): the baseline
            self.evaluate()
        self.spikes = SpikeWatch(st.spike_window, st.spike_factor)
        self.timer = StepTimer(self.step, self.tokens)
        self.skipped = 0  # batches skipped for a non-finite loss (nan_policy: skip)
        self.model.train()

    def _every(self, n: int) -> bool:
        """Every `n` steps, and at the last step of the stage."""
        return self.step % n == 0 or self.step == self.total_steps

    def watch(self, loss: float | None) -> None:
        """After a step: count a skipped batch (loss None), or warn of a loss spike."""
        if loss is None:
            self.skipped += 1
            return
        mean = self.spikes.check(loss)
        if mean is not None:
            self.ev.emit("warning", kind="loss_spike", step=self.step, loss=loss, mean=mean,
                         message=f"loss {loss:.4g} >= {self.stage.spike_factor:g} × recent mean {mean:.4g}")

    def log_metrics(self, loss: float, lr: float, grad_norm: float | None) -> None:
        t = self.timer.lap(self.step, self.tokens)
        self.ev.emit("metric", step=self.step, tokens=self.tokens, loss=loss, lr=lr, grad_norm=grad_norm,
                     tokens_per_s=t.tokens_per_s, total_steps=self.total_steps, data_wait_s=t.data_wait_s,
                     step_time_s=t.step_time_s, cpu_s=t.cpu_s, elapsed=t.elapsed, skipped=self.skipped)

    def agreed_stop(self) -> bool:
        """Whether any rank got SIGTERM (a collective: every rank calls it at the same points)."""
        return self.dist.sum([1.0 if self.stop_requested else 0.0], self.accelerator.device)[0] > 0

    def train_step(self, lr: float) -> tuple[float | None, float | None, bool] | None:
        """One optimizer step over the rank's share of the global batch. Returns (mean loss over the
        whole batch, or None if non-finite; grad norm; whether any rank got SIGTERM), or None if the
        ranks agreed to stop before one of its micro-batches (nothing of the step is applied). The
        time spent fetching batches goes to self.timer."""
        st, acc = self.stage, self.accelerator
        mb, n = st.micro_batch_size, self.accum
        base = self.position + self.rank * mb * n
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64)
        wait = 0.0
        self.step_rng = rng_state() if n > 1 else None  # a stop mid-step checkpoints these
        self.faults.step_begins(self.step + 1)
        for m in range(n):
            if m and self.agreed_stop():
                self.optimizer.zero_grad(set_to_none=True)  # (DeepSpeed: the process exits without stepping)
                return None
            self.faults.micro_begins(self.step + 1, m, n)
            t0 = time.perf_counter()
            x = self.data.batch(range(base + m * mb, base + (m + 1) * mb)).to(acc.device, non_blocking=True)
            wait += time.perf_counter() - t0
            last = m == n - 1
            if self.ds:
                loss = self.lm_loss(x)
                loss = self.faults.loss(loss, self.step + 1, m)
                self.model.backward(loss)  # DeepSpeed divides by the accumulation steps itself
                if not last:
                    self.model.step()  # counts the micro-step; it updates only at the boundary
            else:
                ctx = acc.no_sync(self.model) if self.world > 1 and not last else nullcontext()
                with ctx:
                    with acc.autocast():
                        loss = self.lm_loss(x)
                    loss = self.faults.loss(loss, self.step + 1, m)
                    acc.backward(loss / n)
            loss_sum += loss.detach().double().cpu()
        self.timer.waited(wait)
        total, stop = self.dist.sum([float(loss_sum), 1.0 if self.stop_requested else 0.0], acc.device)
        mean = total / (n * self.world)
        if not math.isfinite(mean):
            self.ev.emit("warning", kind="nan", step=self.step + 1, loss=None,
                         message=f"non-finite loss at step {self.step + 1}: "
                         + ("batch skipped" if st.nan_policy == "skip" and not self.ds else
                            "stopping" + (" (DeepSpeed cannot skip a step)" if self.ds else "")))
            self.optimizer.zero_grad(set_to_none=True)
            return None, None, stop > 0
        if self.ds:
            self.model.step()
            gn = self.model.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else None
        else:
            grad_norm = None
            if st.optimizer.grad_clip:
                grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), st.optimizer.grad_clip))
            self.guard.decay(lr, st.optimizer.weight_decay)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.restore()
        return mean, grad_norm, stop > 0

    # ------------------------------------------------------------------ ReLoRA
    def _set_phase(self) -> None:
        from engine.lora import set_relora_phase

        set_relora_phase(self.unwrapped, self.step < self.relora.warm_start_steps, self.full_rank)

    def _relora_after_step(self) -> None:
        from engine.lora import merge_and_reinit, reset_optimizer_state

        r, s = self.relora, self.step
        if r.warm_start_steps and s == r.warm_start_steps:
            self._set_phase()
            self.ev.emit("relora", step=s, action="switch")
        elif s > r.warm_start_steps and (s - r.warm_start_steps) % r.merge_every == 0 and s < self.total_steps:
            norm = merge_and_reinit(self.unwrapped, seed=self.seed * 1_000_003 + s)
            reset_optimizer_state(self.opt, self.adapters, r.reset, r.prune_ratio)
            self.ev.emit("relora", step=s, action="merge", delta_norm=norm,
                         merges=(s - r.warm_start_steps) // r.merge_every)

    # ------------------------------------------------------------------ end
    def _on_sigterm(self, *_):
        self.stop_requested = True  # acted on at the end of the current step, agreed by all ranks

    def export(self) -> None:
        """The final model in Hugging Face format (written to a temporary directory, then renamed)."""
        from engine.lora import export_model

        self.dist.barrier()
        state_dict = None
        dt = self.model_dtype  # the export is in model.dtype (README "GPU readiness")
        if self.ds and self.stage.zero_stage == 3:
            state_dict = self.accelerator.get_state_dict(self.model)  # collective gather, to rank 0 only
            if state_dict is not None:  # other ranks get None
                state_dict = {k: v.to(dt) if v.is_floating_point() else v for k, v in state_dict.items()}
        if self.rank == 0:
            final, tmp = self.layout.final, self.layout.tmp_final
            shutil.rmtree(tmp, ignore_errors=True)
            model = self.unwrapped
            restore_head(model)  # the real lm_head Linear again (same Parameter)
            if self.stage.lora:
                model.save_pretrained(str(tmp / "adapter"))
                model = export_model(model)
            if state_dict is None:
                model.to(dt)  # training is over: in place keeps tied weights tied
            model.save_pretrained(str(tmp), state_dict=state_dict)
            self.tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.dist.barrier()


def _adamw(groups: list[dict], fused: bool, **kw) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (one pass over all tensors; the HF Trainer's default too)
    where this torch and device have it, else the multi-tensor (foreach) one."""
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(groups, **kw)


def _extend_context(config, seq_len: int, rope_theta: float | None) -> None:
    """Context extension: positions for `seq_len`, and optionally a new RoPE base. In transformers 5
    the base lives in `config.rope_parameters["rope_theta"]`; older versions use `config.rope_theta`."""
    if getattr(config, "max_position_embeddings", seq_len) < seq_len:
        config.max_position_embeddings = seq_len
    if rope_theta is None:
        return
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = float(rope_theta)
    else:
        config.rope_theta = float(rope_theta)


def _keep_freed_memory() -> None:
    """CPU training frees and re-allocates the same large tensors every step, and glibc hands them
    back to the OS each time (munmap, heap trimming), then page-faults to get them again: ~3,500
    faults per step for the tiny demo model, ~5% of its step time. Keep freed memory in the heap.
    Only on CPU-only machines with glibc; elsewhere nothing changes."""
    if torch.cuda.is_available():
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
        libc.mallopt(m_trim_threshold, 512 << 20)
        libc.mallopt(m_top_pad, 64 << 20)
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _keep_freed_memory()
    cfg = json.loads(Path(argv[0]).read_text())
    try:
        trainer = Trainer(cfg)  # records its own failure once its event log is open
    except UserError as e:  # refused (recorded as a failed status): the message, no traceback
        print(f"engine.train: {e}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        code = trainer.run()
    except UserError as e:
        trainer.fail(e)
        print(f"engine.train: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # recorded, then re-raised so the traceback reaches the log
        trainer.fail(e)
        raise
    trainer.ev.close()
    if trainer.dist.on:
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
