import sys
from pathlib import Path

# The project root on sys.path, so `engine`, `cpt_tui` and `tests.*` import without an install.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.hosts import *  # noqa: E402,F401,F403  (fixtures: sshd_loopback, netns_nodes)
from tests.demo_run import *  # noqa: E402,F401,F403  (fixtures: shared_cache, cpt_home, demo_run)

# Keep what the code caches per user (engine/data/tiktoken_bpe.py's probe verdict, DeepSpeed's JIT-built CPU
# ops under torch_extensions) out of the real ~/.cache: one directory per test session, shared by the
# pytest-xdist workers (they inherit CPT_TEST_CACHE from the controller; torch locks its extension builds).
import os  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

os.environ.setdefault("CPT_TEST_CACHE", tempfile.mkdtemp(prefix="cpt-tests-cache-"))
os.environ["XDG_CACHE_HOME"] = os.environ["CPT_TEST_CACHE"]

# Under `pytest -n 2 --dist loadgroup` (the README's test command) a group runs on one worker. Every file is
# its own group (module fixtures are built once), except files that share an expensive session fixture:
# they run together so it is built once. The longest groups go first so the two workers end together.
_GROUPS = {
    "test_benchmarks_run": "demo", "test_from_stage": "demo", "test_skeleton": "demo",  # demo_run
    "test_engine_train": "prepared", "test_gpu_readiness": "prepared",  # prepared (tiny model + shards)
    "test_slurm_backend": "slurm", "test_slurm_cluster": "slurm",  # one 2-node Slurm cluster
}
_FIRST = ["slurm", "prepared", "demo", "test_ssh_noshare"]  # the slowest (Slurm waits on its scheduler)


def _group(item) -> str:
    return _GROUPS.get(item.path.stem, item.path.stem)


# tryfirst: xdist's own hook turns the marker into the scheduling group (a nodeid suffix); run after it,
# the marker was ignored and every test was scheduled alone (each worker built every fixture).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for it in items:
        it.add_marker(pytest.mark.xdist_group(_group(it)))
    rank = {g: i for i, g in enumerate(_FIRST)}
    items.sort(key=lambda it: rank.get(_group(it), len(rank)))  # stable: file order kept otherwise
