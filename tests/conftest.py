import sys
from pathlib import Path

# The project root on sys.path, so `engine`, `cpt_tui` and `tests.*` import without an install.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.hosts import *  # noqa: E402,F401,F403  (fixtures: sshd_loopback, netns_nodes)
from tests.demo_run import *  # noqa: E402,F401,F403  (fixtures: shared_cache, cpt_home, demo_run)

# Keep what the code caches per user (e.g. engine/data/tiktoken_bpe.py's probe verdict) out of the real ~/.cache.
import os  # noqa: E402
import tempfile  # noqa: E402

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="cpt-tests-cache-")
