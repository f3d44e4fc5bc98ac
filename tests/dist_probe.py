"""A tiny stand-in for `engine.train`, launched by the launch tests as `-m tests.dist_probe <spec.json>`.

`spec.json`: {"out": dir, "sleep": seconds (optional), "env": [names to record] (optional)}.
Each rank initialises `Accelerator(cpu=True)`, all-reduces `rank + 1` (when distributed) and writes
`<out>/rank<r>.json` with what it saw: rank, world size, the sum, accelerate's view, cwd, pid, env.
With "sleep", it then sleeps (the no-orphans test kills the launcher meanwhile).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        total = float(t.item())
        backend = dist.get_backend()
    else:
        rank, world, total, backend = 0, 1, 1.0, None
    out = spec["out"]
    os.makedirs(out, exist_ok=True)
    record = {
        "rank": rank,
        "world_size": world,
        "sum": total,
        "backend": backend,
        "distributed_type": str(acc.distributed_type),
        "accelerate_num_processes": acc.num_processes,
        "accelerate_process_index": acc.process_index,
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "netns": os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else None,
        "env": {k: os.environ.get(k) for k in spec.get("env", [])},
    }
    tmp = os.path.join(out, f".rank{rank}.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(out, f"rank{rank}.json"))
    if spec.get("sleep"):
        time.sleep(float(spec["sleep"]))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
