"""python -m engine.benchmarks DIR: write the local task set into DIR and print the include path."""

import sys

from engine.benchmarks import write_local_tasks

if __name__ == "__main__":
    print(write_local_tasks(sys.argv[1] if len(sys.argv) > 1 else "cpt_local_tasks"))
