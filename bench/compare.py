"""FedMFS against every baseline and its own sweeps, reported as a paper would: `fedmfs compare`.

This script is a wrapper kept for the commands in docs/benchmarks.md; the one implementation is
`fedmfs compare` (fedmfs/cli.py over fedmfs.sim.compare and fedmfs.sim.grid), with the same options:
`python bench/compare.py --help` is `fedmfs compare --help`.

    python bench/compare.py --split validation --rounds 20                     # tuning, on a local Ray
    python bench/compare.py --rounds 20 --plot pareto.png                      # reporting
    python bench/compare.py --preset small --rounds 2 --seeds 0 1 --variants fedmfs all --clients 3 \\
        --check-serial                                                         # Ray == serial, measured
    python bench/compare.py --load runs/compare/headroom-test-r20 --plot pareto.png   # saved runs
"""

from __future__ import annotations

import sys

from fedmfs.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
