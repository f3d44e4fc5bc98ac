"""The Slurm backend: one batch job per stage attempt.

`start` writes a generated batch script (RUN_DIR/stages/S/slurm.ATTEMPT.sbatch, every value quoted
with shlex.quote) and submits it with `sbatch --parsable`; the job id is the Proc's `pid`
(`backend="slurm"`, `start=-1`: never a local process, so the generic Proc methods never signal a
local pid). The script

- asks for `slurm.nodes` nodes × 1 task (`#SBATCH` lines from the `slurm:` block, `--signal=B:TERM@grace`),
- finds the main process address: the first host of the allocation (`scontrol show hostnames`), as its
  `NodeAddr` (`scontrol show node -o`; on most clusters the node name itself),
- `srun`s one `accelerate launch --num_machines N --machine_rank $SLURM_NODEID --main_process_ip <that>`
  (`--main_process_port`: cluster.main_process_port, else PORT_BASE + job id % PORT_SPAN) per node
  under a small task wrapper (`_TASK`: ignores TERM itself, waits until every descendant is gone — the
  trainer may still be writing its checkpoint when accelerate exits — and exits with the launcher's
  status), with the stage's env exported,
- traps the batch shell's TERM (Slurm sends it `grace` s before the time limit, and on preemption):
  it leaves a marker file and forwards TERM to the job's steps (`scancel --signal=TERM`), so the
  trainer checkpoints and exits; the stage is then resubmitted without counting as a crash,
- writes the step's exit status to RUN_DIR/stages/S/slurm.ATTEMPT.exit (Slurm forgets finished jobs
  after MinJobAge; there may be no accounting database).

Lifecycle: `poll` reads `squeue -h -j J -o '%T|%r'` (at most once per `POLL_S`), and once the job has
left the queue, `scontrol show job -o J` (JobState, Reason, ExitCode; `sacct` is not assumed) plus the
exit file. `stop` = `scancel --signal=TERM J` (the steps only: the trainer checkpoints and exits 75,
then the script ends the job); a pending job is simply cancelled; `stop(force=True)` = `scancel J`.
Jobs outlive the supervisor: `adopt` re-attaches by job id. Telemetry: `srun --overlap --jobid J`
runs `engine.telemetry` on every allocated node, each sample named by `$SLURMD_NODENAME`.

Client commands run here with the supervisor's (starter's) environment (`SLURM_CONF` etc.), or on
`slurm.login` over ssh (one quoted command string). The run directory must be on a filesystem the
nodes share (same absolute path).
"""

from __future__ import annotations

import atexit
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from cpt_tui.backends import Backend, LaunchError, NodeCommand
from cpt_tui.backends.accelerate import LAUNCH_MODULE, forced_cpu, launch_args, stage_deepspeed
from cpt_tui.backends.shell import check_env
from cpt_tui.procs import LOST, Proc, start as start_guarded
from cpt_tui.redact import redact
from engine.layout import RunLayout, StageLayout
from engine.spec import ClusterSpec, SlurmSpec, StageSpec

POLL_S = 1.0  # at most one squeue per job per second
CMD_TIMEOUT = 30.0
NODEID, MAIN_IP, MAIN_PORT = "{SLURM_NODEID}", "{MAIN_IP}", "{MAIN_PORT}"  # filled in by the task wrapper
MAIN_IP_VAR, MAIN_PORT_VAR = "CPT_SLURM_MAIN_IP", "CPT_SLURM_MAIN_PORT"
# Without cluster.main_process_port, the rendezvous port follows from the job id (as in most sites' sbatch
# scripts): jobs sharing a node (a few GPUs each) never share one fixed port; below the ephemeral range.
PORT_BASE, PORT_SPAN = 10000, 20000
TASK_PLACEHOLDER = "<task>"
PROPAGATED_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "CPT_FAULT_")
PROPAGATED_NAMES = ("HF_HOME", "PYTHONPATH", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE")
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
REQUEUE_STATES = {"TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL"}  # not the trainer's fault

# The task wrapper on each node: `python -c _TASK launcher-argv...`. Fills in the machine rank and the
# main address, ignores TERM itself (slurmstepd signals every process of the step: the trainer gets
# it directly), and as a child subreaper waits for every descendant before exiting with the
# launcher's status, so the step does not end (and kill the trainer) while a checkpoint is written.
_TASK = r"""
import ctypes, os, signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *a: None)
signal.signal(signal.SIGINT, lambda *a: None)
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
except Exception:
    pass
env = os.environ
sub = {"{SLURM_NODEID}": env.get("SLURM_NODEID", "0"), "{MAIN_IP}": env.get("CPT_SLURM_MAIN_IP", ""),
       "{MAIN_PORT}": env.get("CPT_SLURM_MAIN_PORT", "")}
argv = [sub.get(a, a) for a in sys.argv[1:]]
port = argv[argv.index("--main_process_port") + 1] if "--main_process_port" in argv else "?"
print("cpt-tui slurm: node %s machine_rank %s job %s main %s port %s" % (env.get("SLURMD_NODENAME"),
      sub["{SLURM_NODEID}"], env.get("SLURM_JOB_ID"), sub["{MAIN_IP}"], port), flush=True)
child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
rc = 1
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if pid == child.pid:
        rc = os.waitstatus_to_exitcode(status)
sys.exit(rc if rc >= 0 else 128 - rc)
""".strip() + "\n"


# Telemetry follower (local, under the collector): `python -c _FOLLOW JOB_FILE argv...` — whenever
# JOB_FILE names a running job, runs argv with `<job>` replaced (srun --overlap --jobid J ...), its
# stdout passed through; between jobs (pending, next stage) it waits. Ends with its stdin / SIGTERM.
_FOLLOW = r"""
import os, signal, subprocess, sys, threading, time
job_file, argv = sys.argv[1], sys.argv[2:]
child = None
def end(*_):
    if child is not None and child.poll() is None:
        child.terminate()
    os._exit(0)
signal.signal(signal.SIGTERM, end)
def eof():
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    end()
threading.Thread(target=eof, daemon=True).start()
while True:
    try:
        job = open(job_file).read().split()
    except OSError:
        job = []
    if len(job) == 2 and job[1] == "RUNNING":
        child = subprocess.Popen([a.replace("<job>", job[0]) for a in argv], stdin=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        child.wait()
        time.sleep(3)
    else:
        time.sleep(1)
""".strip() + "\n"


def _propagated(name: str) -> bool:
    return name in PROPAGATED_NAMES or name.startswith(PROPAGATED_PREFIXES)


def _directive_value(what: str, value: str) -> str:
    value = str(value)
    if not value or any(c.isspace() for c in value) or value.startswith("-"):
        raise LaunchError(f"slurm.{what}: invalid value {value!r} (no spaces, must not start with '-')")
    return value


def directives(spec: SlurmSpec, processes_per_node: int) -> list[str]:
    """The `#SBATCH` options of a stage job (resources only; paths go on the command line)."""
    d = [f"--nodes={spec.nodes}", "--ntasks-per-node=1"]
    for opt, what in (("partition", "partition"), ("account", "account"), ("qos", "qos"), ("time", "time"),
                      ("gres", "gres"), ("constraint", "constraint")):
        v = getattr(spec, what)
        if v is not None:
            d.append(f"--{opt}={_directive_value(what, v)}")
    if spec.signal_grace:
        d.append(f"--signal=B:TERM@{spec.signal_grace}")
    return d


def parse_record(text: str) -> dict[str, str]:
    """`scontrol show job -o J` → {key: value} (values have no spaces in the fields we read)."""
    out = {}
    for tok in text.split():
        k, sep, v = tok.partition("=")
        if sep and k not in out:
            out[k] = v
    return out


def exit_code_of(state: str, exit_code: str, file_rc: Optional[int]) -> int:
    """The exit code to report for an ended job: its script's status if it wrote one, else
    Slurm's ExitCode (`code:signal`); never 0 for a job that did not complete."""
    if file_rc is not None and (state == "COMPLETED" or file_rc != 0):
        return file_rc
    if state == "COMPLETED":
        return 0
    code, _, sig = (exit_code or "0:0").partition(":")
    try:
        rc = int(code) or (128 + int(sig or 0))
    except ValueError:
        rc = 1
    return rc if rc != 128 and rc != 0 else 1


@dataclass
class JobState:
    state: str  # Slurm's JobState (PENDING, RUNNING, ..., or GONE: forgotten)
    reason: str = "None"
    exit_code: str = ""
    nodes: str = ""
    seen: float = 0.0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class SlurmBackend(Backend):
    kind = "slurm"

    def __init__(self, cluster: ClusterSpec, **kw):
        super().__init__(cluster, **kw)
        self.spec: SlurmSpec = cluster.slurm or SlurmSpec()
        self.jobs: dict[str, JobState] = {}
        self.current: Optional[str] = None  # the job telemetry follows
        self.stopping: set[str] = set()
        self._job_file: Optional[str] = None  # what the telemetry follower reads: "JOB STATE"
        self._job_note = ""

    def _note_job(self, job: str, state: str) -> None:
        if self._job_file is None or job != self.current:
            return
        note = f"{job} {state}"
        if note != self._job_note:
            self._job_note = note
            tmp = self._job_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(note)
            os.replace(tmp, self._job_file)

    # ------------------------------------------------------------------ client commands
    def _prefix(self) -> list[str]:
        login = self.spec.login
        if not login:
            return []
        if login.startswith("-") or any(c.isspace() for c in login):
            raise LaunchError(f"slurm.login: invalid ssh destination {login!r}")
        return ["ssh", *self.cluster.ssh_options, "-T", "-o", "BatchMode=yes", login, "--"]

    def _argv(self, argv: Sequence[str]) -> list[str]:
        prefix = self._prefix()
        return [*prefix, shlex.join(argv)] if prefix else list(argv)

    def _env(self) -> dict:
        return dict(self.local_env)

    def _run(self, argv: Sequence[str], timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self._argv(argv), env=self._env(), capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
        except FileNotFoundError as e:
            return subprocess.CompletedProcess(argv, 127, "", f"{e.filename}: command not found")
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]}: no answer within {timeout:g} s")

    # ------------------------------------------------------------------ commands and the script
    def _job_env(self) -> dict[str, str]:
        env = {k: v for k, v in self.local_env.items() if _propagated(k)}
        env.update(check_env(self.cluster.env, "cluster.env"))
        return env

    def commands(self, stage: StageSpec, stage_json: str, run_dir: str, *, write_configs: bool = True,
                 module: str = "engine.train", main_process_port: Optional[int] = None) -> list[NodeCommand]:
        spec, cluster = self.spec, self.cluster
        cpu = forced_cpu(self.cluster.device) if self.cpu is None else self.cpu
        if "=" in spec.python:
            raise LaunchError(f"slurm.python {spec.python!r}: the path must not contain '='")
        machines, total = spec.nodes, spec.nodes * cluster.processes_per_node
        ds_path = stage_deepspeed(stage, total, run_dir, cpu=cpu, write=write_configs)
        launch = [spec.python, "-m", LAUNCH_MODULE, *launch_args(
            total=total, machines=machines, rank=0, main_ip=MAIN_IP if machines > 1 else None,
            port=main_process_port or cluster.main_process_port or MAIN_PORT, stage=stage, ds_path=ds_path, cpu=cpu,
            module=module, stage_json=stage_json)]
        if machines > 1:
            launch[launch.index("--machine_rank") + 1] = NODEID
        directives(spec, cluster.processes_per_node)  # validates
        for x in spec.extra:
            if "\n" in x or "\0" in x:
                raise LaunchError(f"slurm.extra: {x!r} must be one line")
        sl = RunLayout(run_dir).stage(stage.name)
        env = self._job_env()
        cmd = NodeCommand("slurm", self.submission(stage.name, sl, 1, run_dir), env, bool(spec.login), 0, launch,
                          os.getcwd(), "")
        cmd.display = self._display(cmd, stage.name, sl, 1)
        return [cmd]

    def job_name(self, stage_name: str) -> str:
        return f"{self.spec.job_name or 'cpt'}-{stage_name}"

    def submission(self, stage_name: str, sl: StageLayout, attempt: int, run_dir: str) -> list[str]:
        """The sbatch argv (before the login prefix): paths as separate words, never through a shell."""
        return ["sbatch", "--parsable", f"--job-name={self.job_name(stage_name)}", f"--output={sl.log}",
                "--open-mode=append", f"--chdir={os.getcwd()}", "--export=ALL", *self.spec.extra,
                str(sl.sbatch_script(attempt))]

    def script(self, launch: Sequence[str], env: dict, sl: StageLayout, attempt: int, stage_name: str,
               *, task_code: Optional[str] = None) -> str:
        """The batch script of one stage attempt. Every value is a single shell-quoted word."""
        q = shlex.quote
        spec = self.spec
        lines = ["#!/bin/bash", f"# cpt-tui: stage {stage_name!r}, attempt {attempt} (generated; values quoted)"]
        lines += [f"#SBATCH {d}" for d in directives(spec, self.cluster.processes_per_node)]
        lines += [f"export {k}={q(v)}" for k, v in env.items()]
        exit_path, marker = sl.job_exit(attempt), sl.job_signalled(attempt)
        task = q(_TASK) if task_code is None else task_code
        srun = ["srun", f"--nodes={spec.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--export=ALL"]
        lines += [
            'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            "addr=$(scontrol show node \"$first\" -o | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p' | head -n 1)",
            f'export {MAIN_IP_VAR}="${{addr:-$first}}"',
            *([f"export {MAIN_PORT_VAR}=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))"] if MAIN_PORT in launch else []),
            f"on_term() {{ : > {q(str(marker))}; scancel --signal=TERM \"$SLURM_JOB_ID\"; }}",
            "trap on_term TERM  # Slurm's pre-time-limit / preemption signal: the trainer checkpoints",
            f"{shlex.join(srun)} {q(spec.python)} -c {task} {shlex.join(launch)} &",
            "step=$!",
            'wait "$step"; rc=$?',
            'while kill -0 "$step" 2>/dev/null; do wait "$step"; rc=$?; done',
            'wait "$step" 2>/dev/null; r=$?; [ "$r" -ne 127 ] && rc=$r',
            f"printf '%s\\n' \"$rc\" > {q(str(exit_path) + '.tmp')} && mv -f {q(str(exit_path) + '.tmp')} {q(str(exit_path))}",
            'exit "$rc"',
        ]
        return "\n".join(lines) + "\n"

    def _display(self, cmd: NodeCommand, stage_name: str, sl: StageLayout, attempt: int) -> str:
        script = self.script(cmd.launch, redact(cmd.env), sl, attempt, stage_name, task_code=TASK_PLACEHOLDER)
        return (f"# batch script {sl.sbatch_script(attempt)}:\n{script}\n# submitted with:\n"
                f"{shlex.join(self._argv(self._attempt_argv(cmd, sl, attempt)))}")

    @staticmethod
    def _attempt_argv(cmd: NodeCommand, layout: StageLayout, attempt: int) -> list[str]:
        """The sbatch argv of stage attempt `attempt` (commands() builds attempt 1's): its script, its log."""
        argv = [*cmd.argv[:-1], str(layout.sbatch_script(attempt))]
        return [a if not a.startswith("--output=") else f"--output={layout.log}" for a in argv]

    def describe(self, cmds: Sequence[NodeCommand], *, started: bool = False, attempt: int = 1) -> str:
        lines = []
        for c in cmds:
            display = c.display
            if attempt != 1:  # the script of this attempt (commands() renders attempt 1's)
                sl = StageLayout(Path(c.argv[-1]).parent)
                display = self._display(c, sl.name, sl, attempt)
            lines += [f"# Slurm: one batch job of {self.spec.nodes} node(s) × {self.cluster.processes_per_node} "
                      f"process(es)" + (f", via {self.spec.login}" if self.spec.login else ""), display, ""]
        port = (f", {MAIN_PORT} ({PORT_BASE} + job id % {PORT_SPAN})" if any(MAIN_PORT in c.launch for c in cmds)
                else "")
        lines.append(f"# {TASK_PLACEHOLDER}: a small Python wrapper (cpt_tui.backends.slurm._TASK) that fills in "
                     f"{NODEID} ($SLURM_NODEID), {MAIN_IP} (the first node's address){port}, and waits for the "
                     "trainer's checkpoint before the step ends")
        return "\n".join(lines)

    # ------------------------------------------------------------------ preflight
    def preflight(self, timeout: float = 10, stages=()) -> None:
        r = self._run(["sinfo", "-h", "-o", "%P"], timeout=timeout + 20)
        where = f" on {self.spec.login}" if self.spec.login else ""
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip().splitlines()
            raise LaunchError(f"slurm: the scheduler does not answer{where} (sinfo: "
                              f"{why[-1] if why else 'exit ' + str(r.returncode)}); check SLURM_CONF / the login node")
        parts = [p.strip().rstrip("*") for p in r.stdout.split()]
        if self.spec.partition is not None and self.spec.partition not in parts:
            raise LaunchError(f"slurm: partition {self.spec.partition!r} does not exist{where}; "
                              f"partitions: {', '.join(parts) or '(none)'}")

    # ------------------------------------------------------------------ start / follow
    def start(self, cmds: Sequence[NodeCommand], layout: StageLayout, attempt: int) -> list[Proc]:
        procs = []
        for c in cmds:
            script = layout.sbatch_script(attempt)
            for p in (layout.job_exit(attempt), layout.job_signalled(attempt)):
                p.unlink(missing_ok=True)
            fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)  # may hold secrets
            with os.fdopen(fd, "w") as f:
                f.write(self.script(c.launch, c.env, layout, attempt, layout.name))
            r = self._run(self._attempt_argv(c, layout, attempt), timeout=60)
            job = r.stdout.strip().split(";")[0]
            if r.returncode != 0 or not job.isdigit():
                why = (r.stderr or r.stdout).strip()
                raise LaunchError(f"slurm: sbatch failed (exit {r.returncode}): {why}")
            with open(layout.log, "a") as log:
                log.write(f"cpt-tui slurm: submitted batch job {job} (attempt {attempt})\n")
            self.jobs[job] = JobState("PENDING", "None", seen=0.0)
            self.current = job
            procs.append(Proc("slurm", int(job), -1, time.time(), str(layout.job_exit(attempt)), True, self.kind))
        return procs

    def job(self, job: str, *, fresh: bool = False) -> JobState:
        """The job's state, from squeue while queued/running, then from scontrol (cached once ended)."""
        js = self.jobs.get(job)
        now = time.monotonic()
        if js is not None and (not js.active or (not fresh and now - js.seen < POLL_S)):
            return js
        r = self._run(["squeue", "-h", "-j", job, "-o", "%T|%r|%N"])
        out = r.stdout.strip().splitlines()
        if r.returncode == 0 and out:
            state, _, rest = out[0].partition("|")
            reason, _, nodes = rest.partition("|")
            js = JobState(state.strip(), reason.strip() or "None", "", nodes.strip(), now)
            if js.active:
                self.jobs[job] = js
                self._note_job(job, js.state)
                return js
        r = self._run(["scontrol", "show", "job", "-o", job])
        if r.returncode == 0 and "JobState=" in r.stdout:
            rec = parse_record(r.stdout)
            js = JobState(rec.get("JobState", "UNKNOWN"), rec.get("Reason", "None"), rec.get("ExitCode", ""),
                          rec.get("NodeList", ""), now)
        elif r.returncode != 0 and "Invalid job id" in (r.stderr + r.stdout):
            js = JobState("GONE", "forgotten by Slurm", "", "", now)
        else:  # the controller did not answer: assume unchanged
            return self.jobs.get(job) or JobState("UNKNOWN", "no answer from Slurm", seen=now)
        self.jobs[job] = js
        self._note_job(job, js.state)
        return js

    def _file_rc(self, p: Proc) -> Optional[int]:
        try:
            return int(Path(p.exit_file).read_text()) if p.exit_file else None
        except (OSError, ValueError):
            return None

    def poll(self, procs: Sequence[Proc]) -> list[Optional[int]]:
        out: list[Optional[int]] = []
        for p in procs:
            if p.backend != self.kind:
                out.append(p.poll())
                continue
            js = self.job(str(p.pid))
            if js.active or js.state == "UNKNOWN":
                out.append(None)
            elif js.state == "GONE":
                rc = self._file_rc(p)
                out.append(LOST if rc is None else rc)
            else:
                out.append(exit_code_of(js.state, js.exit_code, self._file_rc(p)))
        return out

    def scheduler_state(self, procs: Sequence[Proc]) -> Optional[dict]:
        """{"job", "state", "reason", "nodes"} of the stage's job (for the runs list), or None."""
        for p in procs:
            if p.backend == self.kind:
                js = self.job(str(p.pid))
                return {"job": str(p.pid), "state": js.state, "reason": js.reason, "nodes": js.nodes}
        return None

    def requeue_reason(self, procs: Sequence[Proc]) -> Optional[str]:
        """Why the ended job should be resubmitted without counting a crash (time limit, preemption,
        node failure), or None."""
        for p in procs:
            if p.backend != self.kind:
                continue
            js = self.job(str(p.pid), fresh=True)
            if js.state in REQUEUE_STATES:
                return f"Slurm job {p.pid} ended {js.state} (reason {js.reason})"
            if js.state == "CANCELLED":  # scancel (even -s KILL) TERMs the batch shell too: not the scheduler's
                return None
            if p.exit_file and Path(p.exit_file).with_suffix(".signalled").exists():
                return (f"Slurm job {p.pid} got the scheduler's TERM (time limit within "
                        f"{self.spec.signal_grace} s, or preemption)")
        return None

    def failure_reason(self, procs: Sequence[Proc], layout: StageLayout) -> Optional[str]:
        """A job Slurm could not start on its nodes (JobLaunchFailure: slurmd could not open the output
        file, seen as ExitCode 0:53): almost always nodes that do not see the run directory."""
        for p in procs:
            if p.backend != self.kind:
                continue
            js = self.job(str(p.pid))
            if js.reason == "JobLaunchFailure":
                return (f"Slurm could not launch job {p.pid} on {js.nodes or 'its nodes'} ({js.state}, "
                        f"Reason=JobLaunchFailure, ExitCode={js.exit_code}): the nodes must see the run "
                        f"directory at the same path (its output file {layout.log}) on a filesystem they "
                        "share (set CPT_TUI_HOME there); the node's slurmd log names the path it could not open")
        return None

    def _scancel(self, args: Sequence[str]) -> None:
        self._run(["scancel", *args])

    def stop(self, procs: Sequence[Proc], *, force: bool = False) -> None:
        for p in procs:
            if p.backend != self.kind:
                p.signal(9 if force else 15)
                continue
            job = str(p.pid)
            js = self.job(job, fresh=True)
            if not js.active:
                continue
            if force or js.state not in ("RUNNING", "COMPLETING"):
                self._scancel([job])  # pending: nothing has started, nothing to checkpoint
            else:
                self.stopping.add(job)
                self._scancel(["--signal=TERM", job])  # the steps only: the trainer checkpoints, exits 75

    def abort(self, procs: Sequence[Proc]) -> None:
        self.stop(procs, force=True)

    def adopt(self, procs: Sequence[Proc], *, sleep, log) -> Optional[list[Proc]]:
        mine = [p for p in procs if p.backend == self.kind]
        if not mine:
            return list(procs) or None
        for p in mine:
            self.current = str(p.pid)
            js = self.job(str(p.pid), fresh=True)
            log(f"re-attaching to Slurm job {p.pid}: {js.state} ({js.reason})")
        return list(procs)

    # ------------------------------------------------------------------ telemetry
    def telemetry_commands(self, interval: float = 2.0, *, kill_grace: float = 5.0) -> list[NodeCommand]:
        inner = ["bash", "-c", 'exec "$0" -m engine.telemetry --interval "$1" --node "$SLURMD_NODENAME"',
                 self.spec.python, f"{interval:g}"]
        srun = ["srun", "--overlap", "--jobid", "<job>", f"--nodes={self.spec.nodes}", "--ntasks-per-node=1",
                "--quiet", "--export=ALL"]
        return [NodeCommand("slurm", [*srun, *inner], {}, bool(self.spec.login), 0, inner, None,
                            shlex.join(self._argv([*srun, *inner])))]

    def start_telemetry(self, cmd: NodeCommand, *, stdout=None, stderr=None):
        """A local follower that runs the srun --overlap sampler step in whichever job is running."""
        if self._job_file is None:
            fd, self._job_file = tempfile.mkstemp(prefix="cpt-slurm-job-")
            os.close(fd)
            atexit.register(lambda f=self._job_file: [Path(x).unlink(missing_ok=True) for x in (f, f + ".tmp")])
            js = self.jobs.get(self.current) if self.current else None
            if js is not None:
                self._note_job(self.current, js.state)
        run = replace(cmd, argv=[sys.executable, "-c", _FOLLOW, self._job_file, *self._argv(cmd.argv)],
                      env=self._env(), remote=False)
        return start_guarded(run, stdout=stdout, stderr=stderr)
