"""Longer fuzzing of every public RPC through the edge than CI runs (issue 21).

    python bench/fuzz_bench.py [--examples 200]

Runs tests/e2e/test_fuzz.py (JSON and protobuf input for each routed RPC, tests/fuzz_support.py)
with this many Hypothesis examples per RPC and form instead of CI's few, against its own
mesh; a failure prints Hypothesis's smallest failing input. It prints pytest's summary.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=200)
    options = parser.parse_args()
    env = {**os.environ, "TELEVOTE_FUZZ_EXAMPLES": str(options.examples)}
    sys.exit(subprocess.run(
        [sys.executable, "-m", "pytest", "tests/e2e/test_fuzz.py", "-q", "-p", "no:cacheprovider",
         "--timeout", "0"], cwd=ROOT, env=env).returncode)


if __name__ == "__main__":
    main()
