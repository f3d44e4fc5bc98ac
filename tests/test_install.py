"""Installable anywhere (issue 16): the wheel carries the shipped presets, and works from any directory.

The fresh venv. Re-installing torch + transformers + datasets ... into a new venv costs minutes on
two cores and needs the network, so the venv gets the CI venv's third-party packages through a
.pth file naming its site-packages — but not the project: a directory named in a .pth file is only
added to sys.path, the .pth files inside it (setuptools' `__editable__*` finder of an editable
install) are not executed, and the source tree is never on sys.path (cwd is an empty temporary
directory, PYTHONPATH is unset). The wheel is installed with `pip install --no-deps` BEFORE the .pth
is written, so pip never sees (or uninstalls) the CI venv's editable cpt-tui. Then `cpt_tui` and
`engine` can only come from the wheel — the test checks that they do.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.demo_run import ROOT, tiny_preset

pytestmark = pytest.mark.timeout(600)


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("cpt_tui", "engine")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the source tree: setuptools' build/ directory in the tree would keep stale
    # files of an earlier build (and two builds at once would share it).
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp / "dist")], check=True, capture_output=True, cwd=tmp)
    whl = next((tmp / "dist").glob("cpt_tui-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)], check=True,
                   env=env, cwd=tmp, capture_output=True)
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "zz_ci_third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return whl, venv, site, env


def _cli(venv: Path, args: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "cpt-tui"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_wheel_metadata_base_install_has_no_ui_stack(wheel_venv):
    import zipfile

    whl = wheel_venv[0]
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = z.namelist()
    base = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert base and not [line for line in base if re.search(r"textual|ruamel|apprise|wandb|mlflow", line)], base
    assert "cpt_tui/builtin_presets/tiny-demo.yaml" in names and "cpt_tui/ui/app.tcss" in names


def test_wheel_plan_presets_and_a_run_from_an_unrelated_directory(wheel_venv, tmp_path, shared_cache):
    whl, venv, site, env = wheel_venv
    work = tmp_path / "elsewhere"
    work.mkdir()
    home = tmp_path / "home"
    env = {**env, "CPT_TUI_HOME": str(home), "CPT_TUI_CACHE": str(shared_cache), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import cpt_tui, engine; from cpt_tui import paths;"
                            "print(cpt_tui.__file__); print(engine.__file__); print(paths.builtin_presets_dir())"],
                           env=env, cwd=work, capture_output=True, text=True, check=True).stdout.split()
    assert all(w.startswith(str(site)) for w in where), where  # from the wheel, not the source tree

    r = _cli(venv, ["plan", "tiny-demo"], env, work)
    assert r.returncode == 0, r.stderr
    assert "preset tiny-demo: 2 stage(s)" in r.stdout

    (home / "presets").mkdir(parents=True)
    tiny_preset(home / "presets" / "my-tiny.yaml", stages=(("s1", 12),), every=100, name="my-tiny")
    r = _cli(venv, ["presets"], env, work)
    assert r.returncode == 0, r.stderr
    shipped = {p.stem for p in (ROOT / "presets").glob("*.yaml")}
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip() and not line.startswith("(")}
    assert shipped | {"my-tiny"} <= set(rows), r.stdout
    assert "1234" in rows["tiny-demo"] and "stdlib prose" in rows["tiny-demo"] and "shipped" in rows["tiny-demo"]
    assert "user" in rows["my-tiny"]

    r = _cli(venv, ["--run", "my-tiny"], env, work, timeout=400)  # a real (tiny) run, from the wheel
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "done" in r.stdout

    r = _cli(venv, ["plan", "no-such-preset"], env, work)
    assert r.returncode == 2 and "tiny-demo" in r.stderr  # the known names are listed
