"""The trainer: one stage, run as `accelerate launch ... -m engine.train STAGE.json`.

A custom accelerate loop (not the HF Trainer): the engine owns the sample order (engine.data.mixture)
so that the position in a stage is one integer and resume is exact. Writes `events.jsonl` (see
engine.events), atomic checkpoints under `checkpoints/step-N`, and the final model in Hugging Face
format under `final/`.

Exit codes: 0 done, 1 failed, 75 stopped by SIGTERM after a checkpoint (resumable).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from engine.data.mixture import block_order, plan_mixture
from engine.data.pack import open_tokens, write_json_atomic
from engine.events import EventWriter
from engine.plan import warmup_steps
from engine.schedule import lr_factor
from engine.spec import MixtureSpec, StageSpec
from engine.trainable import apply_trainable

EXIT_STOPPED = 75


class Stop(Exception):
    pass


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


def _world() -> tuple[int, int]:
    # torch.distributed is the truth: under DeepSpeed on CPU accelerate may report 1 process.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted((p for p in ckpt_root.glob("step-*") if (p / "trainer_state.json").exists()),
                  key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


class Trainer:
    def __init__(self, cfg: dict):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.stage = StageSpec.model_validate(cfg["stage"])
        self.mix = MixtureSpec.model_validate(cfg["mixture"])
        self.out = Path(cfg["out_dir"])
        self.ckpt_root = self.out / "checkpoints"
        cuda = torch.cuda.is_available()
        precision = self.stage.precision
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
        self.notes = []
        if not cuda and mp == "fp16":  # fp16 autocast needs a GPU; bf16 works on CPU
            mp = "no"
            self.notes.append("fp16 requested but no GPU: training in fp32")
        self.rank, self.world = None, None
        kwargs = {}
        ds_cfg = os.environ.get("CPT_DEEPSPEED_CONFIG")
        if ds_cfg:
            from accelerate.utils import DeepSpeedPlugin
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=json.load(open(ds_cfg)))
        self.accelerator = Accelerator(cpu=not cuda, mixed_precision=mp, **kwargs)
        self.rank, self.world = _world()
        if not ds_cfg and self.accelerator.num_processes != self.world:
            raise RuntimeError(f"accelerate sees {self.accelerator.num_processes} processes, torch.distributed {self.world}")
        per_step = self.stage.micro_batch_size * self.world
        if self.stage.global_batch_size % per_step:
            raise ValueError(f"global_batch_size {self.stage.global_batch_size} is not a multiple of "
                             f"micro_batch_size × world size = {per_step}")
        self.accum = self.stage.global_batch_size // per_step  # accumulated by hand (see run())
        self.ev = EventWriter(self.out / "events.jsonl", self.stage.name, enabled=self.rank == 0)
        self.seed = self.mix.seed if self.mix.seed is not None else cfg["seed"] + cfg["stage_index"]
        set_seed(cfg["seed"] + cfg["stage_index"])
        self.stop_requested = False

    # ------------------------------------------------------------------ setup
    def build(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg, st = self.cfg, self.stage
        self.tokenizer = AutoTokenizer.from_pretrained(cfg["tokenizer_dir"])
        model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
        if st.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.guard = apply_trainable(model, st.trainable, st.trainable.old_vocab_size or cfg.get("old_vocab_size"))
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        o = st.optimizer
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=st.schedule.lr, betas=o.betas, eps=o.eps)
        self.data = StageData(cfg, st, self.mix, self.seed)
        self.total_steps = len(self.data) // st.global_batch_size
        if st.max_steps:
            self.total_steps = min(self.total_steps, st.max_steps)
        if self.total_steps <= 0:
            raise ValueError("the stage has 0 steps: its token budget is smaller than one global batch")
        self.warmup = warmup_steps(st, self.total_steps)
        # The scheduler is stepped by us once per optimizer step (accelerate's wrapper would step it
        # once per process), so it is not passed to prepare().
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(st.schedule, s, self.total_steps, self.warmup))
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        self.val = val_blocks(cfg, st.seq_len, st.eval.max_blocks)
        self.step, self.position = 0, 0

    # ------------------------------------------------------------------ state
    def save_checkpoint(self) -> None:
        acc = self.accelerator
        final = self.ckpt_root / f"step-{self.step}"
        tmp = self.ckpt_root / f".tmp-step-{self.step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.rank == 0:
            state = {"step": self.step, "position": self.position, "scheduler": self.scheduler.state_dict(),
                     "tokens_per_source": self.data.tokens_per_source(self.position)}
            write_json_atomic(tmp / "trainer_state.json", state)
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_root)
            kept = sorted((p for p in self.ckpt_root.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
            for old in kept[: -self.stage.checkpoint.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            self.ev.emit("checkpoint", step=self.step, path=str(final))
        acc.wait_for_everyone()

    def load_checkpoint(self, path: Path, full: bool = True) -> None:
        st = self.stage
        load_opt = full or st.load_optimizer
        load_sched = full or st.load_lr_scheduler
        opt_state = None if load_opt else self.optimizer.state_dict()
        self.accelerator.load_state(str(path))
        if not load_opt:  # weights only: a fresh optimizer state
            self.optimizer.load_state_dict(opt_state)
        state = json.loads((path / "trainer_state.json").read_text())
        # The step and data position are kept whatever load_optimizer / load_lr_scheduler say.
        self.step, self.position = state["step"], state["position"]
        if load_sched:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            self.scheduler.last_epoch = self.step
            for g in self.optimizer.param_groups:
                g["lr"] = st.schedule.lr * lr_factor(st.schedule, self.step, self.total_steps, self.warmup)

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        out = {}
        mb = self.stage.micro_batch_size
        for domain, blocks in self.val.items():
            total, n = 0.0, 0
            for i in range(0, len(blocks), mb):
                x = blocks[i:i + mb].to(self.accelerator.device)
                with self.accelerator.autocast():
                    loss = self.model(input_ids=x, labels=x).loss
                k = x.numel() - x.shape[0]  # predicted positions
                total += loss.float().item() * k
                n += k
            out[domain] = total / n
            self.ev.emit("eval", step=self.step, tokens=self.position * self.stage.seq_len, domain=domain,
                         loss=out[domain], blocks=len(blocks))
        self.model.train()
        return out

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        st, acc = self.stage, self.accelerator
        self.ev.emit("status", state="starting", world_size=self.world, grad_accum=self.accum)
        for n in self.notes:
            self.ev.emit("warning", message=n)
        self.build()
        resumed = latest_checkpoint(self.ckpt_root)
        if resumed is not None:
            self.load_checkpoint(resumed, full=True)
        elif self.cfg.get("resume_from"):
            self.load_checkpoint(Path(self.cfg["resume_from"]), full=False)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.ev.emit("status", state="running", step=self.step, total_steps=self.total_steps,
                     resumed_from=str(resumed) if resumed else None)
        if self.step == 0 and self.val:
            self.evaluate()
        per_rank = st.micro_batch_size * self.accum
        gb, mb = st.global_batch_size, st.micro_batch_size
        t_last, tok_last = time.time(), self.position * st.seq_len
        self.model.train()
        while self.step < self.total_steps:
            base = self.step * gb + self.rank * per_rank
            loss_sum = torch.zeros((), device=acc.device)
            for m in range(self.accum):
                x = self.data.batch(range(base + m * mb, base + (m + 1) * mb)).to(acc.device)
                sync = m == self.accum - 1
                ctx = nullcontext() if sync or self.world == 1 else acc.no_sync(self.model)
                with ctx:
                    with acc.autocast():
                        loss = self.model(input_ids=x, labels=x).loss
                    acc.backward(loss / self.accum)
                loss_sum += loss.detach().float()
            grad_norm = None
            if st.optimizer.grad_clip:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), st.optimizer.grad_clip)
            mean_loss = acc.reduce(loss_sum / self.accum, reduction="mean").item()
            if not math.isfinite(mean_loss):
                self.ev.emit("warning", kind="nan", step=self.step + 1, message=f"non-finite loss {mean_loss}")
                if st.nan_policy == "stop":
                    self.ev.emit("status", state="failed", reason=f"non-finite loss at step {self.step + 1}")
                    return 1
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.position += gb
                continue
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.restore()
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.step += 1
            self.position += gb
            tokens = self.position * st.seq_len
            if self.step % st.log_every == 0 or self.step == self.total_steps:
                now = time.time()
                tps = (tokens - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, tokens
                self.ev.emit("metric", step=self.step, tokens=tokens, loss=mean_loss, lr=lr,
                             grad_norm=float(grad_norm) if grad_norm is not None else None, tokens_per_s=tps,
                             total_steps=self.total_steps)
            if self.val and (self.step % st.eval.every_steps == 0 or self.step == self.total_steps):
                self.evaluate()
            ck = st.checkpoint
            if (ck.every_steps and self.step % ck.every_steps == 0) or (
                    ck.every_tokens and tokens // ck.every_tokens != (tokens - gb * st.seq_len) // ck.every_tokens):
                if self.step < self.total_steps:
                    self.save_checkpoint()
            if self._stop_agreed():
                self.save_checkpoint()
                self.ev.emit("status", state="stopped", step=self.step, reason="SIGTERM")
                return EXIT_STOPPED
        self.export()
        self.ev.emit("status", state="done", step=self.step, tokens=self.position * st.seq_len)
        return 0

    def _on_sigterm(self, *_):
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        # Every rank must stop after the same step, or the collectives of the next one would hang.
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def export(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.out / "final"
        model = acc.unwrap_model(self.model)
        if acc.is_main_process:
            tmp = self.out / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp), state_dict=acc.get_state_dict(self.model))
            self.tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        else:
            acc.get_state_dict(self.model)  # ZeRO-3 gathers collectively
        acc.wait_for_everyone()


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(Path(argv[0]).read_text())
    trainer = Trainer(cfg)
    try:
        code = trainer.run()
    except Exception as e:  # recorded, then re-raised so the traceback reaches the log
        trainer.ev.emit("status", state="failed", reason=f"{type(e).__name__}: {e}")
        trainer.ev.close()
        raise
    trainer.ev.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
