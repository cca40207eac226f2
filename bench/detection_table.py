"""The headline detection table: every attack x {forward, backward} x {none, sentinel} at 16 x 8.

    python bench/detection_table.py                 # the full table (about an hour on two cores)
    python bench/detection_table.py --parts matrix  # only the 128-worker matrix

Same as ``sentinel-sim --table``; see :mod:`sentinel.sim.table` for the parts and the options.
Writes ``results/detection_table.md``, ``results/loss_curves.png`` and
``results/detection_latency.png``; every run is cached under ``runs/detection_table/`` so an
interrupted table resumes. Reads the corpora from ``../shared/data`` beside the repository.
"""

from __future__ import annotations

import sys

from sentinel.sim.table import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="python bench/detection_table.py")
