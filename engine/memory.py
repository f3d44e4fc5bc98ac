"""Training memory and time before launch: arithmetic on the model config, no weights, no torch.

Per process (one GPU, or one CPU process): parameters, gradients and optimizer states as the
trainer (engine/train.py) allocates them — fp32 weights (the model is loaded in float32; bf16/fp16
is autocast) with torch's AdamW, or DeepSpeed's ZeRO 1/2/3 partitions (16-bit weights + fp32 master
copy under bf16/fp16, optional CPU offload) — with LoRA adapters / modules_to_save, frozen
parameters and EEVE's row-guarded embeddings (the whole tensor keeps a gradient and Adam moments:
the hook only zeroes old rows) counted; then the activations saved for the backward of one micro
batch (SDPA or eager attention, with or without gradient checkpointing) and the loss buffer (the
chunked fused head + cross-entropy of engine/loss.py, or the full logits of the standard loss).

ETA: training FLOPs = (2 forward + 2 input-gradient + 2 weight-gradient-of-trainable) × matmul
parameters per token + attention (causal: 6 · layers · seq · attention width per token, forward
and backward), × 4/3 forward again under gradient checkpointing; at an assumed MFU of a given peak
until a measured throughput exists.

The architecture and its parameter shapes come from engine/arch.py (their one home).
"""

from __future__ import annotations

from typing import Optional

from engine.arch import (Arch, arch_from_hf, arch_from_spec, base_arch, count_params, extended,  # noqa: F401
                         numel, param_shapes, with_vocab)
from engine.params import Tensors, stage_tensors  # noqa: F401  (which tensors train: their one home)

GiB = 1024**3
# engine/loss.py:PLAIN_HEAD_FAMILIES (that module imports torch)
PLAIN_HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3"}
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
STEP_BYTES = 4  # AdamW's `step`: one fp32 scalar tensor per parameter tensor


def preset_arch(preset, vocab_size: Optional[int] = None) -> Optional[Arch]:
    """The architecture a preset trains, or None when it cannot be known without downloading.
    `vocab_size`: the tokenizer's length when known (built models, extended vocabularies)."""
    a, _ = base_arch(preset)
    if a is None and vocab_size and preset.model.config is not None:
        a = arch_from_spec(preset.model.config, vocab_size)
    if a is None:
        return None
    return with_vocab(a, vocab_size) if vocab_size else extended(a, preset)


# --------------------------------------------------------------------------- parameters


def largest_layer_params(a: Arch) -> int:
    """The largest module's own parameters (DeepSpeed's ZeRO-3 gather working set)."""
    return max(numel(s) for s in param_shapes(a).values())


# --------------------------------------------------------------------------- model states


def _partition(n: int, world: int, align: int = 1) -> int:
    """Elements of one rank's share of n, padded as DeepSpeed pads (to a multiple of align × world)."""
    step = align * world
    return -(-n // step) * step // world


def zero_partitions(t: Tensors, zero_stage: int, world: int, precision: str = "fp32",
                    groups: Optional[list[list[str]]] = None) -> dict:
    """One rank's DeepSpeed storage, padded as DeepSpeed pads: the model's parameters (ZeRO-3: each
    tensor's `ds_tensor`, ceil(numel / world)), the fp32 master partition, the gradient partition
    (between backward and step) and the Adam moments. `groups`: the optimizer's parameter groups
    (default: one of every trainable tensor); ZeRO-1/2 flatten each, padded to 2 × world elements."""
    b16 = 4 if precision == "fp32" else 2
    names = [n for n in t.shapes if n in t.trainable]
    groups = groups or [names]
    if zero_stage == 3:
        per = sum(-(-numel(t.shapes[n]) // world) for n in t.shapes)
        part = sum(-(-numel(t.shapes[n]) // world) for g in groups for n in g)
        return {"params": b16 * per, "master": 4 * part, "grads": 4 * part, "moments": ADAM_STATE_BYTES * part}
    part = sum(_partition(sum(numel(t.shapes[n]) for n in g), world, align=2) for g in groups)
    g = (4 if precision == "fp32" else 2 + 4) if zero_stage >= 2 else 4
    return {"params": b16 * t.count(), "master": 4 * part, "grads": g * part, "moments": ADAM_STATE_BYTES * part}


def model_states(t: Tensors, zero_stage: int, precision: str, world: int, offload: str = "none",
                 gpus_per_node: Optional[int] = None, largest_layer: Optional[int] = None) -> dict:
    """Bytes per process of parameters, gradients and optimizer states (`*_cpu`: offloaded, per process).

    ZeRO 0 (no DeepSpeed): fp32 weights, fp32 gradients of the trainable tensors, AdamW moments + step;
    with several processes DDP keeps its own gradient buckets (`ddp_buckets`).
    DeepSpeed ZeRO 1/2/3, as its model-state estimators count (estimate_zero{2,3}_model_states_mem_needs):
    16-bit weights (fp32 when precision is fp32) — partitioned in ZeRO-3, plus the largest layer
    gathered —, 16-bit + fp32 gradients (partitioned from ZeRO-2), fp32 master + Adam moments
    (partitioned). Frozen parameters are weights only; the optimizer holds the trainable ones."""
    pt, pf, n_tensors = t.n_trainable, t.n_frozen, len(t.trainable)
    b16 = 4 if precision == "fp32" else 2
    r = {"params": 0, "grads": 0, "optimizer": 0, "ddp_buckets": 0, "params_cpu": 0, "grads_cpu": 0,
         "optimizer_cpu": 0}
    if zero_stage == 0:
        r["params"] = 4 * (pt + pf)
        r["grads"] = 4 * pt
        r["optimizer"] = ADAM_STATE_BYTES * pt + STEP_BYTES * n_tensors
        r["ddp_buckets"] = 4 * pt if world > 1 else 0
        return r
    # fp32 under DeepSpeed: the weights are already fp32 and there is no 16-bit gradient copy
    g16 = 0 if precision == "fp32" else 2
    part = pt / world
    lay = 4 * (largest_layer or 0)
    r["params"] = b16 * (pt + pf) / world + lay if zero_stage == 3 else b16 * (pt + pf)
    if zero_stage == 1:
        grads = b16 * pt + 4 * part * (g16 > 0)
    elif zero_stage == 2:
        grads = (g16 + 4) * part
    else:
        grads = 4 * part
    opt = (4 + ADAM_STATE_BYTES) * part  # fp32 master + moments
    if offload == "cpu":  # DeepSpeed's CPU Adam: fp32 gradients, master and moments in host memory
        gpn = gpus_per_node or world
        r["optimizer_cpu"] = opt
        if zero_stage == 3:  # offload_param as well: the 16-bit partitions move to the host
            r["grads_cpu"] = 4 * part
            r["params_cpu"] = b16 * (pt + pf) / world
            r["params"] = lay
        else:  # as DeepSpeed's estimator: max(4 × GPUs, 16) bytes per parameter per node
            r["grads_cpu"] = max(4 * world, 16) * pt / gpn - opt
    else:
        r["grads"], r["optimizer"] = grads, opt
    return {k: int(v) for k, v in r.items()}


# --------------------------------------------------------------------------- activations and loss


def compute_mode(precision: str, zero_stage: int) -> str:
    """fp32; `autocast` (fp32 weights, bf16/fp16 matmuls: no DeepSpeed); `pure16` (DeepSpeed bf16/fp16)."""
    if precision == "fp32":
        return "fp32"
    return "pure16" if zero_stage > 0 else "autocast"


def activations(a: Arch, seq: int, micro: int, mode: str = "fp32", checkpointing: bool = False,
                attention: str = "sdpa") -> dict:
    """Bytes saved for the backward of one micro batch, per process (Llama decoder, HF modules).

    Per layer, T = micro·seq tokens: each RMSNorm keeps its input, the normalised and the scaled
    output (fp32: HF computes norms in float32), plus a 16-bit copy under autocast; q (after RoPE),
    k, v, the attention output and its contiguous copy for o_proj, the log-sum-exp (SDPA; eager:
    the softmax and dropout outputs, b·heads·seq² each); gate, up, SiLU and product (4 × T ×
    intermediate). Gradient checkpointing keeps each layer's input and recomputes one layer."""
    t = seq * micro
    h, i = a.hidden_size, a.intermediate_size
    e = 4 if mode == "fp32" else 2  # matmul outputs
    res = 2 if mode == "pure16" else 4  # the residual stream
    norm = (4 + 4 + (4 if mode != "pure16" else 2) + (2 if mode == "autocast" else 0)) * t * h
    attn = e * t * (3 * a.q_width + 2 * a.kv_width) + 4 * t * a.num_attention_heads
    if attention == "eager":
        attn += 2 * e * micro * a.num_attention_heads * seq * seq
    mlp = 4 * e * t * i
    layer = 2 * norm + attn + mlp
    final = norm
    if checkpointing:  # the layer inputs; one layer is recomputed in the backward, after the loss's peak
        out = {"activations": int(a.num_hidden_layers * res * t * h + final), "recompute": int(layer)}
    else:
        out = {"activations": int(a.num_hidden_layers * layer + final), "recompute": 0}
    if mode == "autocast":  # the 16-bit weight copies autocast makes are kept for the backward
        lin = sum(numel(s) for n, s in param_shapes(a).items() if n.endswith("proj.weight"))
        out["autocast_weights"] = 2 * lin
    return out


def chunk_tokens(vocab: int, gpu: bool = True) -> int:
    """engine/loss.py:chunk_tokens, without torch."""
    return max(16, (2**25 if gpu else 2**19) // vocab)


def loss_buffer(a: Arch, seq: int, micro: int, fused: bool, mode: str = "fp32", gpu: bool = True,
                head_trains: bool = True) -> int:
    """Bytes of the loss at its peak, beyond the activations.
    Fused (engine/loss.py): the hidden-state gradient and its scaled copy (T × hidden, fp32 or the
    hidden dtype), the head's fp32 gradient accumulator (vocab × hidden), one chunk of logits (and
    its 16-bit matmul output). Standard: the logits, their fp32 copy, log_softmax's output and two
    gradients of that size (T × vocab each)."""
    t = seq * micro
    v, h = a.vocab_size, a.hidden_size
    hb = 2 if mode == "pure16" else 4
    if fused:
        c = min(chunk_tokens(v, gpu), t)
        gw = 2 * 4 * v * h if head_trains else 0
        return int(2 * hb * t * h + gw + c * v * (4 + (2 if mode != "fp32" else 0)))
    e = 4 if mode == "fp32" else 2
    return int(t * v * (3 * 4 + (e if mode != "fp32" else 0)))


def step_peak(act: dict, loss: int) -> int:
    """Activations + loss at the peak of a step: the loss's buffers live at the start of the backward,
    with every saved activation; a checkpointed layer is recomputed only after them."""
    return int(act["activations"] + max(loss, act["recompute"]))


# --------------------------------------------------------------------------- time


# Dense peak TFLOP/s assumed when the GPU is not known (A100: bf16/fp16 tensor cores, fp32 without TF32)
ASSUMED_PEAK_TFLOPS = {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}
ASSUMED_MFU = 0.40


def flops_per_token(a: Arch, t: Tensors, seq: int, checkpointing: bool = False) -> float:
    """Training FLOPs per token: 2·N forward + 2·N input gradients + 2·N_trainable weight gradients over
    the matmul weights (transformer linears + head), + causal attention 6·layers·seq·q_width; gradient
    checkpointing adds a second forward."""
    mm = {n: numel(s) for n, s in param_shapes(a).items() if n.endswith("proj.weight") or n == "lm_head.weight"}
    if a.tie_word_embeddings:
        mm["lm_head.weight"] = a.vocab_size * a.hidden_size
    n_mm = sum(mm.values())
    trained = 0
    for n in t.trainable:
        base = n.removeprefix("base_model.model.")
        if base in mm or base == "model.embed_tokens.weight" and a.tie_word_embeddings:
            trained += numel(t.shapes[n])
        elif ".modules_to_save." in n or ".lora_" in n:
            trained += numel(t.shapes[n]) if n.endswith("weight") and len(t.shapes[n]) == 2 else 0
    attn_fwd = 2 * a.num_hidden_layers * seq * a.q_width
    f = 4 * n_mm + 2 * trained + 3 * attn_fwd
    if checkpointing:
        f += 2 * n_mm + attn_fwd
    return float(f)


# --------------------------------------------------------------------------- per stage


OVERHEAD_BYTES = int(1.0 * GiB)  # CUDA context, kernels, allocator slack: not modelled, a fixed reserve


def stage_memory(a: Arch, stage, world: int, tokens: Optional[int] = None, gpu_memory_gb: Optional[float] = None,
                 gpus_per_node: Optional[int] = None, measured_tokens_per_s: Optional[float] = None,
                 peak_tflops: Optional[float] = None, mfu: Optional[float] = None) -> dict:
    """The plan's `memory` entry of one stage (engine.spec.StageSpec): bytes per process, verdict, ETA."""
    relora_warm = bool(stage.lora and stage.lora.relora and stage.lora.relora.warm_start_steps)
    ten = stage_tensors(a, stage.trainable, stage.lora)
    if relora_warm:  # the full-rank tensors sit in the optimizer from the start (engine/train.py)
        full = stage_tensors(a, stage.trainable)
        ten.trainable |= {"base_model.model." + n.replace(".weight", ".base_layer.weight")
                          if "base_model.model." + n.replace(".weight", ".base_layer.weight") in ten.shapes
                          else "base_model.model." + n for n in full.trainable}
        ten.trainable &= set(ten.shapes)
    ms = model_states(ten, stage.zero_stage, stage.precision, world, stage.offload, gpus_per_node,
                      largest_layer_params(a))
    mode = compute_mode(stage.precision, stage.zero_stage)
    act = activations(a, stage.seq_len, stage.micro_batch_size, mode, stage.gradient_checkpointing)
    head = "lm_head.weight" if "lm_head.weight" in ten.shapes else "model.embed_tokens.weight"
    fused = (stage.fused_loss and stage.zero_stage != 3 and a.family in PLAIN_HEAD_FAMILIES
             and not (stage.lora and "lm_head" in (list(stage.lora.target_modules) + list(stage.lora.modules_to_save))))
    loss = loss_buffer(a, stage.seq_len, stage.micro_batch_size, fused, mode,
                       head_trains=head in ten.trainable or not stage.lora and head in ten.trainable)
    gpu_bytes = (ms["params"] + ms["grads"] + ms["optimizer"] + ms["ddp_buckets"] + step_peak(act, loss)
                 + act.get("autocast_weights", 0) + OVERHEAD_BYTES)
    cpu_bytes = ms["params_cpu"] + ms["grads_cpu"] + ms["optimizer_cpu"]
    out = {
        "params_total": ten.count(), "params_trainable": ten.n_trainable, "params_frozen": ten.n_frozen,
        "row_guarded": sorted(ten.guarded),
        "bytes": {**ms, **act, "loss_buffer": loss, "step_peak": step_peak(act, loss),
                  "overhead": OVERHEAD_BYTES},
        "loss": "fused (chunked)" if fused else "standard (full logits)",
        "compute": mode, "gradient_checkpointing": stage.gradient_checkpointing,
        "per_process_gpu_bytes": int(gpu_bytes), "per_process_cpu_bytes": int(cpu_bytes),
        "gpu_memory_bytes": int(gpu_memory_gb * GiB) if gpu_memory_gb else None,
    }
    out["verdict"] = verdict(gpu_bytes, gpu_memory_gb * GiB) if gpu_memory_gb else "unknown GPU memory"
    fpt = flops_per_token(a, ten, stage.seq_len, stage.gradient_checkpointing)
    out["flops_per_token"] = fpt
    if measured_tokens_per_s:
        out["eta_basis"] = f"measured {measured_tokens_per_s:,.0f} tokens/s"
        tps = measured_tokens_per_s
    else:
        peak = peak_tflops or ASSUMED_PEAK_TFLOPS[stage.precision]
        m = mfu or ASSUMED_MFU
        tps = peak * 1e12 * m * world / fpt
        out["eta_basis"] = f"assumed {peak:g} TFLOP/s × MFU {m:.0%} × {world} GPU(s)"
    out["tokens_per_s"] = tps
    out["eta_s"] = tokens / tps if tokens else None
    return out


def verdict(need: float, capacity: float) -> str:
    return "fits" if need <= 0.9 * capacity else "tight" if need <= capacity else "does not fit"


def smallest_gpu(reports: dict) -> Optional[tuple[int, str]]:
    """(bytes, "node N: NAME") of the smallest GPU the nodes' preflight probes (engine/doctor.py reports:
    torch's devices, else NVML's) saw on nodes that will train on CUDA; None if none was seen."""
    best: Optional[tuple[int, str]] = None
    for node, rep in reports.items():
        if not isinstance(rep, dict) or rep.get("device") != "cuda":
            continue
        for d in rep.get("cuda_devices") or (rep.get("nvml") or {}).get("devices") or []:
            if d.get("total_mib"):
                b = int(d["total_mib"]) << 20
                if best is None or b < best[0]:
                    best = (b, f"node {node}: {d.get('name') or 'GPU'} ({d['total_mib']:,} MiB)")
    return best


def judge_against(mem: Optional[dict], capacity: int, where: str) -> Optional[dict]:
    """A plan `memory` entry judged against a GPU of `capacity` bytes (`where`: which one)."""
    if mem is None:
        return None
    return {**mem, "gpu_memory_bytes": capacity, "gpu_memory_source": where,
            "verdict": verdict(mem["per_process_gpu_bytes"], capacity)}


def plan_memory(preset, index: int, tokens: Optional[int], world: int, vocab_size: Optional[int] = None) -> Optional[dict]:
    """stage_memory for the plan, or None when the architecture is unknown (a model not on disk)."""
    a = preset_arch(preset, vocab_size)
    if a is None:
        return None
    c = preset.cluster
    gpn = c.processes_per_node
    return stage_memory(a, preset.stages[index], world, tokens, gpu_memory_gb=c.gpu_memory_gb, gpus_per_node=gpn)


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def fmt_eta(s: Optional[float]) -> str:
    if s is None:
        return "?"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400 * 2:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def format_memory(m: Optional[dict]) -> str:
    """One line for format_plan and the launch screen."""
    if m is None:
        return "memory: unknown (the model's config.json is not on this machine)"
    b = m["bytes"]
    parts = [f"params {fmt_bytes(b['params'])}", f"grads {fmt_bytes(b['grads'])}",
             f"optimizer {fmt_bytes(b['optimizer'])}", f"activations {fmt_bytes(b['activations'])}"
             + (" (ckpt)" if m["gradient_checkpointing"] else ""),
             f"loss {fmt_bytes(b['loss_buffer'])} ({m['loss'].split()[0]})"]
    if b.get("autocast_weights"):
        parts.append(f"autocast copies {fmt_bytes(b['autocast_weights'])}")
    if b.get("ddp_buckets"):
        parts.append(f"DDP buckets {fmt_bytes(b['ddp_buckets'])}")
    line = (f"memory/process: {fmt_bytes(m['per_process_gpu_bytes'])} = " + ", ".join(parts)
            + f" + 1 GiB reserve → {m['verdict']}")
    if m["gpu_memory_bytes"]:
        line += f" ({fmt_bytes(m['gpu_memory_bytes'])} GPU)"
    if m["per_process_cpu_bytes"]:
        line += f"; offloaded to host {fmt_bytes(m['per_process_cpu_bytes'])}"
    tr = f"trainable {m['params_trainable']:,} of {m['params_total']:,} params"
    if m["row_guarded"]:
        tr += " (new rows only: " + ", ".join(x.split(".")[-2] for x in m["row_guarded"]) + ")"
    return line + f"\n    {tr}; ETA {fmt_eta(m['eta_s'])} ({m['eta_basis']}, {m['flops_per_token'] / 1e9:.2f} GFLOP/token)"
