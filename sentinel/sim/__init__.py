"""In-process swarm simulator: the paper's scale on one CPU, with the live swarm's code.

One driver loop, two transports: :mod:`sentinel.sim.transport` plugs in-process stages into the
verifier's :class:`~sentinel.verifier.driver.PipelineDriver`; :mod:`sentinel.sim.swarm` builds and
runs a swarm; :mod:`sentinel.sim.table` runs the detection matrix; ``sentinel-sim`` is the CLI.
"""

from sentinel.sim.swarm import DEFENSES, MODEL_SIZES, SimConfig, Simulation, malicious_slots, run_simulation

__all__ = ["DEFENSES", "MODEL_SIZES", "SimConfig", "Simulation", "malicious_slots", "run_simulation"]
