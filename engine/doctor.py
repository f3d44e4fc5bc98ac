"""What a node can train on: `python -m engine.doctor [--json]`, run on every node by the preflight
(cpt_tui/backends: local and ssh) and by `cpt-tui doctor`.

Reports, for this machine as the trainer would see it: torch's version and CUDA build, whether
torch sees CUDA and how many devices (names, free / total memory), NVML's view (device count, names,
driver version) independently of torch, the NCCL version, CUDA_VISIBLE_DEVICES, LD_LIBRARY_PATH and
the NCCL network plugins it can find, and `device`: what the trainer will use (cuda or cpu).
A GPU node where torch sees no CUDA (a CPU wheel, a driver mismatch, CUDA_VISIBLE_DEVICES="") shows
up here as `nvml.count > 0` and `cuda_available: false`.

engine/gpus.py `gpu_count()` is the light version for the manager (no torch import): NVML through
ctypes, limited by CUDA_VISIBLE_DEVICES. The launcher uses it to resolve `processes_per_node: auto`
on a local cluster.

Test-only: CPT_FAKE_GPU_COUNT=n makes both report n CUDA devices (torch's and NVML's count), with
`fake: true` in the report. Nothing else reads it; it never makes a CPU train on a GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import socket
import sys

from engine.gpus import _fake, format_report, nvml, problems  # noqa: F401  (problems: API)


def _nccl_plugins() -> list[str]:
    found = []
    for d in [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p] + ["/usr/lib", "/usr/local/lib",
                                                                                    "/usr/lib/x86_64-linux-gnu"]:
        found += glob.glob(os.path.join(d, "libnccl-net*.so*"))
    return sorted(set(found))


def probe(device: str = "auto") -> dict:
    """The report (JSON-able). `device`: the preset's cluster.device, to say what the trainer will use."""
    rep: dict = {"host": socket.gethostname(), "python": sys.version.split()[0], "platform": platform.platform(),
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                 "ld_library_path": os.environ.get("LD_LIBRARY_PATH"), "nccl_net_plugins": _nccl_plugins(),
                 "nccl_env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "FI_", "UCX_"))}}
    try:
        import torch

        rep["torch"] = torch.__version__
        rep["torch_cuda_build"] = torch.version.cuda
        rep["cuda_available"] = torch.cuda.is_available()
        rep["cuda_device_count"] = torch.cuda.device_count() if rep["cuda_available"] else 0
        rep["bf16_supported"] = bool(rep["cuda_available"] and torch.cuda.is_bf16_supported())
        devs = []
        for i in range(rep["cuda_device_count"]):
            free, total = torch.cuda.mem_get_info(i)
            devs.append({"index": i, "name": torch.cuda.get_device_name(i), "free_mib": free >> 20,
                         "total_mib": total >> 20, "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))})
        rep["cuda_devices"] = devs
        try:
            v = torch.cuda.nccl.version() if rep["cuda_available"] else None
            rep["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else v
        except Exception as e:  # noqa: BLE001 (a report, not a failure)
            rep["nccl"] = f"unavailable ({type(e).__name__})"
    except ImportError as e:
        rep.update(torch=None, error=f"torch does not import: {e}", cuda_available=False, cuda_device_count=0)
    try:
        import accelerate

        rep["accelerate"] = accelerate.__version__
    except ImportError:
        rep["accelerate"] = None
    try:
        import engine

        rep["engine"] = getattr(engine, "__version__", "?")
    except ImportError:
        rep["engine"] = None
    rep["nvml"] = nvml()
    fake = _fake()
    if fake is not None:  # test-only: see the module docstring
        rep.update(fake=True, cuda_available=fake > 0, cuda_device_count=fake)
        rep["nvml"] = {"available": True, "count": fake, "devices": [], "driver": "fake"}
    rep["device"] = "cpu" if device == "cpu" or not rep["cuda_available"] else "cuda"
    rep["processes_auto"] = rep["cuda_device_count"] if rep["device"] == "cuda" else 1
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.doctor")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    a = ap.parse_args(argv)
    rep = probe(a.device)
    print(json.dumps(rep) if a.json else format_report("this machine", rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
