"""Run by tests/test_gpu_readiness.py as `accelerate launch ... -m tests.gpu_probe STAGE.json`: builds the
stage's Trainer exactly as engine.train does (resume included: weights, `start: resume`), then writes
`<out_dir>/probe.json` (rank 0) with what a GPU user would need to be true: the dtype of the weights as
from_pretrained returned them, the optimizer groups by name (computed by engine.trainable.param_groups on
the built model: under ZeRO-3 its parameters are deepspeed.zero.Init placeholders), whether they are
partitioned, and the real shapes."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch
    import transformers

    from engine.train import Trainer
    from engine.trainable import param_groups, partitioned, real_shape

    loaded: dict[str, str] = {}
    orig = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        m = orig(*a, **kw)
        loaded.update({n: str(p.dtype) for n, p in m.named_parameters()})
        return m

    transformers.AutoModelForCausalLM.from_pretrained = spy
    cfg = json.loads(Path(argv[0]).read_text())
    t = Trainer(cfg)
    t.start()  # resume (or build), snapshot, the running event
    model = t.unwrapped
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{"weight_decay": g["weight_decay"], "params": sorted(names[id(p)] for p in g["params"])}
              for g in param_groups(model, t.stage.optimizer.weight_decay, t.guard)]
    out = {"loaded_dtypes": loaded, "groups": groups,
           "partitioned": any(partitioned(p) for p in model.parameters()),
           "placeholder_ndims": sorted({p.ndim for p in model.parameters()}),
           "shapes": {n: list(real_shape(p)) for n, p in model.named_parameters()},
           "trained_dtypes": {n: str(p.dtype) for n, p in model.named_parameters()},
           "world": t.world, "ds": t.ds}
    if t.rank == 0:
        Path(cfg["out_dir"], "probe.json").write_text(json.dumps(out))
    t.ev.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
