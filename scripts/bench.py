#!/usr/bin/env python
"""Run ``bus bench`` from a checkout without installing: the same command, the same options.

    python scripts/bench.py --records 1000000 --runs 3 --json bench.json

The bench starts its client processes with multiprocessing's "spawn", which re-imports this file in each
of them: hence the ``__main__`` guard.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from bus.cli import bench

    bench.main(args=sys.argv[1:], prog_name="scripts/bench.py")
