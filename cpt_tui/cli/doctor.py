"""`cpt-tui doctor [PRESET] [--json]`: what every node of a preset's cluster (default: this machine)
can train on, from `python -m engine.doctor --json` run there (locally, or over ssh with the node's
python, workdir and env, exactly as the preflight runs it): GPUs seen by torch and by NVML, CUDA and
NCCL versions, driver, free memory, CUDA_VISIBLE_DEVICES, NCCL network plugins, and the device the
trainer will use. Paste its output into the report of a first GPU run (README "GPU readiness").
Exit 0 when every node can train every stage as configured, 2 otherwise (the reasons are printed).
"""

from __future__ import annotations

import json


def cmd_doctor(a) -> int:
    from cpt_tui.backends import LaunchError, backend_for
    from engine.gpus import format_report, problems
    from engine.spec import ClusterSpec

    stages = []
    if a.preset:
        from cpt_tui.presets import load_checked

        _, preset, _ = load_checked(a.preset, check_paths=False)
        cluster, stages = preset.cluster, preset.stages
    else:
        cluster = ClusterSpec()
    b = backend_for(cluster)
    try:
        reports = b.probe(timeout=a.timeout)
    except LaunchError as e:  # ssh: an unreachable node (the others' reports are kept)
        reports, failed = b.reports, str(e)
    else:
        failed = ""
    precisions = {st.precision for st in stages}
    bad = [f"node {n}: {p}" for n, r in reports.items() for p in problems(r, cluster.device, precisions)]
    bad += [ln for ln in failed.splitlines() if ln not in bad]
    if a.json:
        print(json.dumps({"device": cluster.device, "nodes": reports, "problems": bad}, indent=1))
    else:
        for name, rep in reports.items():
            print(format_report(name, rep))
        for p in bad:
            print(f"problem: {p}")
        if not bad:
            print(f"ok: cluster.device {cluster.device}; every node can train "
                  + ("/".join(sorted(precisions)) if precisions else "(no preset given)"))
    return 2 if bad else 0
