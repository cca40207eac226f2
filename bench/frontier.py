"""The detect-or-harmless frontier (see sentinel/sim/frontier.py); writes results/frontier.md + PNGs.

    python bench/frontier.py            # full sweep, 16 x 8 (about an hour on two cores)
    python bench/frontier.py --smoke    # reduced sweep, 4 x 4 (a few minutes)
"""

from __future__ import annotations

import sys

from sentinel.sim.frontier import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="python bench/frontier.py")
