"""The detect-or-harmless frontier (see sentinel/sim/frontier.py); writes results/frontier.md + PNGs.

    python bench/frontier.py            # full sweep, 16 x 8 (about 100 min on two idle cores)
    python bench/frontier.py --smoke    # reduced sweep, 4 x 4 (about 6 min)
"""

from __future__ import annotations

import sys

from sentinel.sim.frontier import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="python bench/frontier.py")
