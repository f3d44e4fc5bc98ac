"""Mutation check: does the test that names a feature fail when that feature is broken?

    python bench/mutate.py                 # every mutation in bench/mutations.toml
    python bench/mutate.py --list          # list them
    python bench/mutate.py -k relora -k S1 # only mutations whose id or file contains a word
    python bench/mutate.py --baseline      # first check that every named test passes unmutated

Each mutation (bench/mutations.toml) is a file, an exact original snippet (found exactly once), its
replacement, and the pytest node ids meant to catch it. The harness copies the tracked files of the
repository (as they are in the work tree) to a temporary directory — never touching the real tree —,
applies one mutation at a time there, runs its tests with a timeout (PYTHONPATH = the copy, no
bytecode written, so a restored file is never shadowed by a stale .pyc), records killed / survived,
restores the file, and prints a table and `score = K/N`. A timeout counts as killed (noted).
CI does not run this: it takes ~15–25 min on a loaded 2-core box.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path) -> list[dict]:
    muts = tomllib.loads(path.read_text())["mutation"]
    for m in muts:
        src = (ROOT / m["file"]).read_text()
        n = src.count(m["original"])
        if n != 1:
            raise SystemExit(f"{m['id']}: the original snippet occurs {n} times in {m['file']} (must be 1)")
    return muts


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        s = ROOT / f
        if s.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, dst / f)


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("CI", None)  # skips stay skips here: a mutant is judged by the tests that run
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                            *tests], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""
    out = r.stdout + r.stderr
    why = next((l.strip() for l in out.splitlines() if l.startswith("E ")), "")
    if r.returncode == 0:
        return "passed", time.time() - t0, ""
    if r.returncode == 5 or "no tests ran" in out:
        return "no-tests", time.time() - t0, out[-400:]
    if r.returncode in (2, 3, 4):  # collection error / internal error / usage: a broken harness, not a kill
        return "error", time.time() - t0, out[-600:]
    return "failed", time.time() - t0, why


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=str(ROOT / "bench" / "mutations.toml"))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="run each distinct test set unmutated first")
    ap.add_argument("-k", action="append", default=[], help="only mutations whose id or file contains this")
    ap.add_argument("--timeout", type=float, default=400)
    a = ap.parse_args()
    muts = load(Path(a.file))
    if a.k:
        muts = [m for m in muts if any(k in m["id"] or k in m["file"] for k in a.k)]
    if a.list:
        for m in muts:
            print(f"{m['id']:5} {m['file']:28} {m['what']}\n      tests: {' '.join(m['tests'])}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="cpt-mutate-") as tmp:
        copy = Path(tmp) / "repo"
        copy_tree(copy)
        if a.baseline:
            for tests in sorted({tuple(m["tests"]) for m in muts}):
                verdict, secs, why = run_tests(copy, list(tests), a.timeout)
                print(f"baseline {verdict:8} {secs:6.0f}s  {' '.join(tests)} {why}", flush=True)
                if verdict != "passed":
                    print("the unmutated tests must pass first", file=sys.stderr)
                    return 2
        for m in muts:
            path = copy / m["file"]
            orig = path.read_text()
            path.write_text(orig.replace(m["original"], m["replacement"], 1))
            try:
                verdict, secs, why = run_tests(copy, m["tests"], a.timeout)
            finally:
                path.write_text(orig)
            status = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}.get(verdict, verdict.upper())
            results.append((m, status, secs, why))
            print(f"{m['id']:5} {status:16} {secs:5.0f}s  {m['file']}: {m['what']}\n{'':29}{why[:150]}", flush=True)
    killed = sum(s.startswith("killed") for _, s, _, _ in results)
    print("\n| id | file | mutation | tests | result | s |\n|---|---|---|---|---|---|")
    for m, s, secs, why in results:
        tests = ", ".join(t.split("::")[-1] for t in m["tests"])
        print(f"| {m['id']} | {m['file']} | {m['what']} | {tests} | {s} | {secs:.0f} |")
    print(f"\nscore = {killed}/{len(results)}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
