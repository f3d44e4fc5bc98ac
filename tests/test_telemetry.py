"""engine.telemetry: host samples here (no GPU), a fake pynvml at the boundary, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest

from engine import telemetry
from engine.telemetry import Sampler

ROOT = Path(__file__).resolve().parents[1]
HOST_KEYS = {"cpu_percent", "ram_used", "ram_total", "disk_used", "disk_total", "net_bytes_sent", "net_bytes_recv"}
GPU_KEYS = {"name", "util_gpu", "util_memory", "mem_used", "mem_total", "temperature", "power_w",
            "power_limit_w", "processes"}


def _check_shape(rec: dict, node: str) -> None:
    assert set(rec) == {"ts", "node", "kind", "index", "metrics"}
    assert isinstance(rec["ts"], float) and abs(rec["ts"] - time.time()) < 60
    assert rec["node"] == node
    assert rec["kind"] in ("host", "gpu")


def _check_host(m: dict) -> None:
    assert HOST_KEYS <= set(m)
    assert 0.0 <= m["cpu_percent"] <= 100.0
    assert 0 < m["ram_used"] <= m["ram_total"]
    assert m["ram_total"] == psutil.virtual_memory().total
    assert 0 < m["disk_used"] <= m["disk_total"]
    assert m["net_bytes_sent"] >= 0 and m["net_bytes_recv"] >= 0


# --------------------------------------------------------------------------- no GPU (this machine)


def host_gpus() -> int:
    """GPUs NVML sees on this machine, asked directly (0 without a driver): what the sampler must report."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def test_host_only_without_nvml(tmp_path):
    # Real lazy import of nvidia-ml-py: without a driver (this CI machine) init fails → host only; on a
    # GPU host the same sampler reports one record per GPU after the host's.
    n = host_gpus()
    with Sampler("n0", path=str(tmp_path)) as s:
        assert s.gpu_count == n
        recs = s.sample()
        recs2 = s.sample()
    for batch in (recs, recs2):
        assert [(r["kind"], r["index"]) for r in batch] == [("host", None)] + [("gpu", i) for i in range(n)]
        for rec in batch:
            _check_shape(rec, "n0")
        _check_host(batch[0]["metrics"])
    assert recs2[0]["ts"] >= recs[0]["ts"]
    assert recs2[0]["metrics"]["net_bytes_recv"] >= recs[0]["metrics"]["net_bytes_recv"]
    json.dumps(recs)  # serialisable as is


def test_nvml_disabled_and_missing_path():
    with Sampler("n1", path="/definitely/not/here", nvml=False) as s:
        (rec,) = s.sample()
    _check_host(rec["metrics"])  # falls back to / for the disk


def test_module_level_sample():
    recs = telemetry.sample("nodeX")
    assert recs and recs[0]["kind"] == "host" and recs[0]["node"] == "nodeX"
    _check_host(recs[0]["metrics"])


class _InitFails:
    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        raise self.NVMLError("Driver Not Loaded")


def test_nvml_init_failure_means_host_only():
    with Sampler("n2", nvml=_InitFails()) as s:
        recs = s.sample()
    assert [r["kind"] for r in recs] == ["host"]


# --------------------------------------------------------------------------- fake pynvml


def make_fake_nvml() -> types.ModuleType:
    """A `pynvml`-shaped module: 2 GPUs; GPU 1 raises NotSupported for power and temperature."""
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_GpuIsLost(NVMLError):
        pass

    nv.NVMLError = NVMLError
    nv.NVMLError_NotSupported = NVMLError_NotSupported
    nv.NVML_TEMPERATURE_GPU = 0
    nv.calls = []
    gpus = [
        dict(name=b"Fake A100", util=(87, 41), mem=(30 << 30, 80 << 30), temp=71, power=312_500, limit=400_000,
             procs=[(4242, 20 << 30), (4343, None)]),
        dict(name="Fake T4", util=(3, 1), mem=(1 << 30, 16 << 30), temp=None, power=None, limit=None,
             procs=[]),
    ]

    def nvmlInit():
        nv.calls.append("init")

    def nvmlShutdown():
        nv.calls.append("shutdown")

    def nvmlDeviceGetCount():
        return len(gpus)

    def nvmlDeviceGetHandleByIndex(i):
        return ("handle", i)

    def g(h):
        assert h[0] == "handle"
        return gpus[h[1]]

    def nvmlDeviceGetName(h):
        return g(h)["name"]

    def nvmlDeviceGetUtilizationRates(h):
        gpu, mem = g(h)["util"]
        return types.SimpleNamespace(gpu=gpu, memory=mem)

    def nvmlDeviceGetMemoryInfo(h):
        used, total = g(h)["mem"]
        return types.SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetTemperature(h, sensor):
        assert sensor == nv.NVML_TEMPERATURE_GPU
        if g(h)["temp"] is None:
            raise NVMLError_NotSupported("Not Supported")
        return g(h)["temp"]

    def nvmlDeviceGetPowerUsage(h):
        if g(h)["power"] is None:
            raise NVMLError_NotSupported("Not Supported")
        return g(h)["power"]

    def nvmlDeviceGetEnforcedPowerLimit(h):
        if g(h)["limit"] is None:
            raise NVMLError_GpuIsLost("GPU is lost")  # any NVMLError, not only NotSupported
        return g(h)["limit"]

    def nvmlDeviceGetComputeRunningProcesses(h):
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in g(h)["procs"]]

    def nvmlDeviceGetGraphicsRunningProcesses(h):
        raise NVMLError_NotSupported("Not Supported")

    for fn in list(locals().values()):
        if callable(fn) and getattr(fn, "__name__", "").startswith("nvml"):
            setattr(nv, fn.__name__, fn)
    return nv


def test_fake_nvml_two_gpus():
    nv = make_fake_nvml()
    s = Sampler("gpu-01", nvml=nv)
    assert nv.calls == ["init"] and s.gpu_count == 2
    recs = s.sample()
    recs_again = s.sample()
    s.close()
    s.close()  # idempotent
    assert nv.calls == ["init", "shutdown"]  # init once, shutdown once

    assert [(r["kind"], r["index"]) for r in recs] == [("host", None), ("gpu", 0), ("gpu", 1)]
    for r in recs:
        _check_shape(r, "gpu-01")
    _check_host(recs[0]["metrics"])
    a, b = recs[1]["metrics"], recs[2]["metrics"]
    assert set(a) == GPU_KEYS and set(b) == GPU_KEYS
    assert a == {
        "name": "Fake A100", "util_gpu": 87, "util_memory": 41, "mem_used": 30 << 30, "mem_total": 80 << 30,
        "temperature": 71, "power_w": 312.5, "power_limit_w": 400.0,
        "processes": [{"pid": 4242, "used_memory": 20 << 30}, {"pid": 4343, "used_memory": None}],
    }
    assert b == {
        "name": "Fake T4", "util_gpu": 3, "util_memory": 1, "mem_used": 1 << 30, "mem_total": 16 << 30,
        "temperature": None, "power_w": None, "power_limit_w": None, "processes": [],
    }
    assert [r["metrics"] for r in recs_again[1:]] == [a, b]
    json.loads(json.dumps(recs))


def test_fake_nvml_every_call_failing_is_all_none():
    nv = make_fake_nvml()

    def boom(*a, **k):
        raise nv.NVMLError("Unknown Error")

    for name in dir(nv):
        if name.startswith("nvmlDevice") and name not in ("nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex"):
            setattr(nv, name, boom)
    with Sampler("g", nvml=nv) as s:
        recs = s.sample()
    assert [r["kind"] for r in recs] == ["host", "gpu", "gpu"]
    for r in recs[1:]:
        assert r["metrics"] == dict.fromkeys(GPU_KEYS)


def test_fake_nvml_count_failure_is_host_only():
    nv = make_fake_nvml()

    def boom():
        raise nv.NVMLError("Unknown Error")

    nv.nvmlDeviceGetCount = boom
    with Sampler("g", nvml=nv) as s:
        assert [r["kind"] for r in s.sample()] == ["host"]
    assert nv.calls == ["init", "shutdown"]


def test_cli_main_in_process_with_fake(capsys):
    nv = make_fake_nvml()
    assert telemetry.main(["--interval", "0", "--count", "2", "--node", "n9"], nvml=nv) == 0
    lines = capsys.readouterr().out.splitlines()
    recs = [json.loads(x) for x in lines]
    assert [(r["kind"], r["index"]) for r in recs] == [("host", None), ("gpu", 0), ("gpu", 1)] * 2
    assert all(r["node"] == "n9" for r in recs)
    assert nv.calls == ["init", "shutdown"]


# --------------------------------------------------------------------------- CLI subprocess


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_cli_subprocess_count():
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "engine.telemetry", "--interval", "0.2", "--count", "2",
                        "--node", "cli-node"], capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    lines = p.stdout.splitlines()
    assert len(lines) >= 2
    recs = [json.loads(x) for x in lines]
    hosts = [r for r in recs if r["kind"] == "host"]
    assert len(hosts) == 2
    for r in recs:
        _check_shape(r, "cli-node")
    for r in hosts:
        _check_host(r["metrics"])
    assert time.monotonic() - t0 < 30


def _start_cli(*extra):
    return subprocess.Popen([sys.executable, "-m", "engine.telemetry", "--interval", "0.1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_cli_exits_cleanly_on_signal(sig):
    p = _start_cli()
    try:
        first = p.stdout.readline()  # it is running and streaming
        json.loads(first)
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert b"Traceback" not in err
    for line in out.splitlines():
        json.loads(line)  # every line complete


def test_cli_exits_cleanly_on_broken_pipe():
    p = _start_cli()
    try:
        json.loads(p.stdout.readline())
        p.stdout.close()  # the reader goes away (like a closed ssh channel)
        rc = p.wait(timeout=20)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err
