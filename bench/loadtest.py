"""`python -m bench.loadtest ARGS` is `televote loadtest ARGS`: the show-night load simulator
(loadtest/), reachable from bench/ like every other benchmark. See `--help`."""

import sys

from ops.cli import app

if __name__ == "__main__":
    app(["loadtest", *sys.argv[1:]], prog_name="python -m bench.loadtest")
