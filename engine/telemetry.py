"""Node telemetry: host metrics (psutil) and, where NVML works, per-GPU metrics (pynvml).

Runs on the GPU nodes (no textual / sqlite_utils / cpt_tui imports). The manager reads it over an
SSH channel:

    python -m engine.telemetry --interval 2 [--count N] [--node NAME] [--path RUN_DIR]

prints one JSON object per line (flushed), one line per sample:

    {"ts": 1700000000.0, "node": "gpu-01", "kind": "host", "index": null, "metrics": {...}}
    {"ts": 1700000000.0, "node": "gpu-01", "kind": "gpu",  "index": 0,    "metrics": {...}}

Host metrics: cpu_percent, ram_used, ram_total, disk_used, disk_total (of --path, default /),
net_bytes_sent, net_bytes_recv (cumulative counters; the reader derives rates), load1.
GPU metrics: name, util_gpu, util_memory (percent), mem_used, mem_total (bytes), temperature (°C),
power_w, power_limit_w, processes ([{"pid", "used_memory"}]). A field the GPU does not report (any
NVMLError, e.g. NotSupported) is None. No NVML / no GPU / init failure: host samples only; sampling
never raises.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

import psutil

__all__ = ["Sampler", "sample", "main"]


def _load_nvml() -> Any:
    try:
        import pynvml  # nvidia-ml-py
    except Exception:
        return None
    return pynvml


class Sampler:
    """Holds the NVML session (initialised once, shut down by `close()`).

    `nvml`: None = import `pynvml` lazily; False = no GPU sampling; a module-like object = use it
    (tests inject a fake). `path`: the directory whose filesystem `disk_*` reports.
    """

    def __init__(self, node: Optional[str] = None, *, path: str = "/", nvml: Any = None):
        self.node = node or socket.gethostname()
        self.path = path
        self._nvml = None
        self._handles: list[Any] = []
        mod = _load_nvml() if nvml is None else (nvml or None)
        if mod is not None:
            try:
                mod.nvmlInit()
            except Exception:
                mod = None
        if mod is not None:
            self._nvml = mod
            try:
                count = int(mod.nvmlDeviceGetCount())
            except Exception:
                count = 0
            for i in range(count):
                try:
                    self._handles.append(mod.nvmlDeviceGetHandleByIndex(i))
                except Exception:
                    self._handles.append(None)
        # psutil's cpu_percent(None) compares with the previous call: prime it so the first
        # sample is a real measurement over the interval, not 0.0.
        try:
            psutil.cpu_percent(interval=None)
        except Exception:
            pass
        self._cpu_primed = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    @property
    def gpu_count(self) -> int:
        return len(self._handles)

    def close(self) -> None:
        mod, self._nvml, self._handles = self._nvml, None, []
        if mod is not None:
            try:
                mod.nvmlShutdown()
            except Exception:
                pass

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; close() is the contract
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ sampling

    def sample(self) -> list[dict]:
        ts = time.time()
        out = [{"ts": ts, "node": self.node, "kind": "host", "index": None, "metrics": self._host()}]
        for i, h in enumerate(self._handles):
            out.append({"ts": ts, "node": self.node, "kind": "gpu", "index": i, "metrics": self._gpu(h)})
        return out

    def _host(self) -> dict:
        m: dict[str, Any] = {}
        # cpu_percent is measured since the previous call; right after priming, measure 0.1 s.
        window = 0.1 if time.monotonic() - self._cpu_primed < 0.05 else None
        m["cpu_percent"] = _safe(lambda: float(psutil.cpu_percent(interval=window)))
        vm = _safe(psutil.virtual_memory)
        m["ram_total"] = vm.total if vm else None
        m["ram_used"] = (vm.total - vm.available) if vm else None
        du = _safe(lambda: psutil.disk_usage(self.path if os.path.exists(self.path) else "/"))
        m["disk_total"] = du.total if du else None
        m["disk_used"] = du.used if du else None
        net = _safe(psutil.net_io_counters)
        m["net_bytes_sent"] = net.bytes_sent if net else None
        m["net_bytes_recv"] = net.bytes_recv if net else None
        m["load1"] = _safe(lambda: os.getloadavg()[0])
        return m

    def _gpu(self, h: Any) -> dict:
        nv = self._nvml
        keys = ("name", "util_gpu", "util_memory", "mem_used", "mem_total", "temperature",
                "power_w", "power_limit_w", "processes")
        if nv is None or h is None:
            return dict.fromkeys(keys)
        m: dict[str, Any] = {}
        name = _safe(lambda: nv.nvmlDeviceGetName(h))
        m["name"] = name.decode(errors="replace") if isinstance(name, bytes) else name
        util = _safe(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        m["util_gpu"] = _attr(util, "gpu")
        m["util_memory"] = _attr(util, "memory")
        mem = _safe(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        m["mem_used"] = _attr(mem, "used")
        m["mem_total"] = _attr(mem, "total")
        sensor = getattr(nv, "NVML_TEMPERATURE_GPU", 0)
        m["temperature"] = _safe(lambda: nv.nvmlDeviceGetTemperature(h, sensor))
        m["power_w"] = _safe(lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
        m["power_limit_w"] = _safe(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0)
        m["processes"] = _safe(lambda: self._procs(h))
        return m

    def _procs(self, h: Any) -> list[dict]:
        nv = self._nvml
        seen: dict[int, Optional[int]] = {}
        for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            get = getattr(nv, fn, None)
            if get is None:
                continue
            try:
                procs = get(h) or []
            except Exception:
                if fn.startswith("nvmlDeviceGetCompute"):
                    raise  # the compute list is the one that matters: unsupported → None
                continue
            for p in procs:
                pid = getattr(p, "pid", None)
                if pid is None:
                    continue
                used = getattr(p, "usedGpuMemory", None)
                pid = int(pid)
                if seen.get(pid) is None:
                    seen[pid] = int(used) if isinstance(used, (int, float)) else None
        return [{"pid": pid, "used_memory": used} for pid, used in sorted(seen.items())]


def _safe(fn: Callable[[], Any]) -> Any:
    """One field: any error (NVMLError_NotSupported, any NVMLError, psutil oddities) reads as None."""
    try:
        return fn()
    except Exception:
        return None


def _attr(obj: Any, name: str) -> Any:
    return getattr(obj, name, None) if obj is not None else None


_default: Optional[Sampler] = None
_default_lock = threading.Lock()


def sample(node: Optional[str] = None, *, path: str = "/") -> list[dict]:
    """One round of samples from a process-wide Sampler (NVML initialised on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Sampler(node, path=path)
        s = _default
    s.path = path
    out = s.sample()
    if node:
        for d in out:
            d["node"] = node
    return out


# ---------------------------------------------------------------------- CLI


class _Stop(Exception):
    pass


def main(argv: Optional[list[str]] = None, *, nvml: Any = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.telemetry",
                                 description="Print node telemetry as JSON lines (one per sample).")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between rounds (default 2)")
    ap.add_argument("--count", type=int, default=None, help="rounds to print, then exit (default: forever)")
    ap.add_argument("--node", default=None, help="node name in the samples (default: hostname)")
    ap.add_argument("--path", default="/", help="directory whose filesystem disk_* reports (default /)")
    args = ap.parse_args(argv)
    if args.interval < 0:
        ap.error("--interval must be >= 0")

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            signal.signal(sig, on_signal)
        except (ValueError, OSError):  # not the main thread / unsupported
            pass

    sampler = Sampler(args.node, path=args.path, nvml=nvml)
    out = sys.stdout
    rounds = 0
    try:
        while not stop.is_set():
            try:
                for rec in sampler.sample():
                    out.write(json.dumps(rec, separators=(",", ":")) + "\n")
                out.flush()
            except BrokenPipeError:
                # The reader went away (ssh channel closed): exit quietly. Point stdout at devnull
                # so the interpreter's final flush does not raise again.
                try:
                    os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
                except Exception:
                    pass
                return 0
            rounds += 1
            if args.count is not None and rounds >= args.count:
                break
            stop.wait(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        sampler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
