"""What every backend runs: the `accelerate launch` argv of one machine, and the DeepSpeed config of
a ZeRO stage (written to the run directory, passed by path)."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from typing import Optional

from cpt_tui.backends import LaunchError
from engine.layout import RunLayout
from engine.spec import MIXED_PRECISION, StageSpec

LAUNCH_MODULE = "accelerate.commands.launch"


def forced_cpu(device: str) -> bool:
    """Whether the launcher itself says CPU (`--cpu` for one process, no pinned memory): only with
    `cluster.device: cpu`. Otherwise the trainer decides on its node (torch.cuda.is_available()):
    the manager's own devices (a GPU-less laptop managing GPU nodes) say nothing about a node's."""
    return device == "cpu"


def stop_env(stop_grace: float) -> dict[str, str]:
    """What makes torchrun's elastic agent wait `stop_grace` seconds between forwarding SIGTERM to
    its workers and SIGKILLing them (its default is 30 s; torch/distributed/launcher/api.py reads
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT when --shutdown_timeout is not given, and accelerate never gives it)."""
    return {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(math.ceil(stop_grace)))}


def guard_grace(stop_grace: float) -> float:
    """The node guard's SIGTERM → SIGKILL grace: after torchrun's, so that torchrun ends its workers first."""
    return float(stop_grace) + 15.0


def free_port() -> int:
    """A TCP port free on this machine now (bound to port 0, then released): the main process port
    of one local stage attempt, so two local runs on one box never share a rendezvous port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(stage: StageSpec, world_size: int, *, cpu: bool = False) -> dict:
    """The DeepSpeed config for a stage (ZeRO stage, offload, batch sizes, clipping, precision)."""
    if world_size < 1:
        raise LaunchError(f"world size {world_size}: need at least one process")
    micro, glob = stage.micro_batch_size, stage.global_batch_size
    if glob % (micro * world_size):
        raise LaunchError(
            f"stage {stage.name}: global_batch_size {glob} is not a multiple of micro_batch_size {micro} × "
            f"{world_size} processes; change global_batch_size or the number of processes")
    accum = glob // (micro * world_size)
    zero: dict = {"stage": stage.zero_stage}
    if stage.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not cpu}
        if stage.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": not cpu}
    if stage.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(stage.optimizer.grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": stage.precision == "bf16"},
        "fp16": {"enabled": stage.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage.precision == "fp16":
        cfg["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                            "hysteresis": 2, "min_loss_scale": 1})
    if stage.offload == "cpu":
        cfg["zero_force_ds_cpu_optimizer"] = False  # the engine's own optimizer is allowed with offload
    return cfg


def stage_deepspeed(stage: StageSpec, world_size: int, run_dir: str, *, cpu: bool,
                    write: bool = True, node_local: bool = False) -> Optional[str]:
    """The path of the stage's DeepSpeed config (written unless `write` is False), None without ZeRO.
    `node_local` (ssh `shared_fs: false`): DeepSpeed writes its checkpoint's common files on every node."""
    if stage.zero_stage <= 0:
        return None
    cfg = deepspeed_config(stage, world_size, cpu=cpu)
    if node_local:
        cfg["checkpoint"] = {"use_node_local_storage": True}
    path = RunLayout(run_dir).deepspeed_config(stage.name)
    if write:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return str(path)


def launch_args(*, total: int, machines: int, rank: int, main_ip: Optional[str], port: int | str, stage: StageSpec,
                ds_path: Optional[str], cpu: bool, module: str, stage_json: str) -> list[str]:
    """The arguments after `python -m accelerate.commands.launch` for machine `rank`."""
    a = ["--num_processes", str(total), "--num_machines", str(machines), "--machine_rank", str(rank)]
    if main_ip:
        a += ["--main_process_ip", main_ip]
    a += ["--main_process_port", str(port), "--mixed_precision", MIXED_PRECISION[stage.precision],
          "--dynamo_backend", "no"]
    if ds_path is not None:
        # accelerate: --use_deepspeed excludes --multi_gpu; it launches torchrun itself. Multi-node
        # needs the `standard` (torchrun on every node) launcher instead of the pdsh default.
        a += ["--use_deepspeed", "--deepspeed_config_file", ds_path]
        if machines > 1:
            a += ["--deepspeed_multinode_launcher", "standard"]
    elif total > 1:
        # Verified: --multi_gpu + Accelerator(cpu=True) gives MULTI_CPU with the full world size,
        # whereas --cpu --num_processes N starts one process.
        a += ["--multi_gpu"]
    elif cpu:
        a += ["--cpu"]
    a += ["-m", module, stage_json]
    return a
