"""GPUs as the manager can count them without importing torch (the UI and CLI import this):
NVML through ctypes, limited by CUDA_VISIBLE_DEVICES; and the checks / rendering of a node's probe
report (engine/doctor.py makes the reports, on the node, with torch).

Test-only: CPT_FAKE_GPU_COUNT=n makes `gpu_count()` and the probe report n CUDA devices.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

FAKE_ENV = "CPT_FAKE_GPU_COUNT"


def _fake() -> Optional[int]:
    v = os.environ.get(FAKE_ENV, "").strip()
    return int(v) if v else None


def _visible_limit() -> Optional[int]:
    """How many devices CUDA_VISIBLE_DEVICES allows (None: not set)."""
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    if v is None:
        return None
    return len([x for x in v.split(",") if x.strip() and not x.strip().startswith("-")])


def nvml() -> dict:
    """NVML's view through ctypes (no pynvml needed): count, names, memory, driver. {} without NVML."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as e:
        return {"available": False, "error": str(e)}
    out: dict = {"available": False}
    try:
        if lib.nvmlInit_v2() != 0:
            return {"available": False, "error": "nvmlInit failed"}
        buf = ctypes.create_string_buffer(96)
        if lib.nvmlSystemGetDriverVersion(buf, 96) == 0:
            out["driver"] = buf.value.decode()
        n = ctypes.c_uint()
        lib.nvmlDeviceGetCount_v2(ctypes.byref(n))
        devices = []
        for i in range(n.value):
            h = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h)) != 0:
                continue
            name = ctypes.create_string_buffer(96)
            lib.nvmlDeviceGetName(h, name, 96)

            class Mem(ctypes.Structure):
                _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

            m = Mem()
            lib.nvmlDeviceGetMemoryInfo(h, ctypes.byref(m))
            devices.append({"index": i, "name": name.value.decode(), "total_mib": m.total >> 20,
                            "free_mib": m.free >> 20})
        out.update(available=True, count=n.value, devices=devices)
        lib.nvmlShutdown()
    except (AttributeError, OSError) as e:
        out["error"] = str(e)
    return out


def gpu_count() -> int:
    """GPUs a trainer started here could use, without importing torch: CPT_FAKE_GPU_COUNT (tests),
    else NVML's count limited by CUDA_VISIBLE_DEVICES, else 0."""
    fake = _fake()
    if fake is not None:
        return fake
    n = nvml().get("count", 0)
    lim = _visible_limit()
    return n if lim is None else min(n, lim)


def problems(rep: dict, device: str, precisions: set[str]) -> list[str]:
    """Why a node cannot run stages of `precisions` with cluster.device `device` (empty: it can)."""
    out = []
    if rep.get("torch") is None:
        out.append(rep.get("error", "torch does not import"))
        return out
    if device == "cpu":
        return out
    if not rep["cuda_available"]:
        seen = rep.get("nvml", {}).get("count", 0)
        why = (f"NVML sees {seen} GPU(s) but torch {rep['torch']} (CUDA build {rep['torch_cuda_build']}) sees none "
               "(a CPU wheel, a driver mismatch, or CUDA_VISIBLE_DEVICES=" + repr(rep["cuda_visible_devices"]) + ")"
               if seen else "torch sees no CUDA device")
        if device == "cuda":
            out.append(f"{why}; cluster.device is cuda")
        elif precisions & {"bf16", "fp16"}:
            out.append(f"{why}, and the preset trains in {'/'.join(sorted(precisions & {'bf16', 'fp16'}))}: it would "
                       "train on the CPU. Fix the node's torch/driver, or set `cluster.device: cpu` to train on the CPU")
    return out


def format_report(name: str, rep: dict) -> str:
    """A readable summary of one node's report (cpt-tui doctor)."""
    nv = rep.get("nvml", {})
    lines = [f"{name} ({rep.get('host')}): device {rep.get('device')}" + ("  [faked: CPT_FAKE_GPU_COUNT]" if rep.get("fake") else ""),
             f"  torch {rep.get('torch')} (CUDA build {rep.get('torch_cuda_build')}), accelerate {rep.get('accelerate')}, "
             f"python {rep.get('python')}",
             f"  torch: cuda available {rep.get('cuda_available')}, {rep.get('cuda_device_count')} device(s), "
             f"NCCL {rep.get('nccl')}, bf16 {rep.get('bf16_supported')}",
             f"  NVML: {nv.get('count', 0) if nv.get('available') else 'unavailable'} device(s), driver {nv.get('driver')}",
             f"  CUDA_VISIBLE_DEVICES={rep.get('cuda_visible_devices')!r}  NCCL net plugins: "
             f"{', '.join(rep.get('nccl_net_plugins') or []) or 'none found'}"]
    for d in rep.get("cuda_devices") or nv.get("devices") or []:
        lines.append(f"    [{d['index']}] {d['name']}: {d.get('free_mib', '?')} MiB free of {d.get('total_mib', '?')} MiB")
    return "\n".join(lines)
