"""The detect-or-harmless frontier (sentinel.sim.frontier) on a swarm small enough for CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.sim.frontier import FrontierConfig, main, plan, plot, points, render
from sentinel.sim.table import execute


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("frontier")
    f = FrontierConfig(stages=3, replicas=3, malicious_fraction=0.34, steps=16, attack_start=6,
                       micro_batches_per_step=3, eval_every=8, sweeps={"scaling": ("factor", (1.1, -1.0))},
                       parts=("sweep",), out=out, cache=out / "cache", name="frontier_ci")
    rows = plan(f)
    execute(rows, f.cache, jobs=1)
    return f, rows


def test_sweep_scores_every_point_against_its_clean_run(swept) -> None:
    f, rows = swept
    assert len(rows) == 2 + 2 * 2 * 2  # clean x 2 defenses + 2 strengths x 2 directions x 2 defenses
    pts = {(p.value, p.direction): p for p in points(rows, "sweep")}
    assert set(pts) == {(1.1, "forward"), (1.1, "backward"), (-1.0, "forward"), (-1.0, "backward")}
    flip = pts[(-1.0, "forward")]
    assert flip.recall == 1.0 and flip.honest_bans == 0 and flip.meets_goal
    assert flip.damage_undefended > 0.05  # a sign flip hurts an undefended swarm
    weak = pts[(1.1, "forward")]
    assert abs(weak.damage) < 0.01 and weak.meets_goal  # x1.1 is harmless either way


def test_render_and_plots(swept) -> None:
    f, rows = swept
    md = render(f, rows, 0.0, "pytest")
    assert "### scaling (factor)" in md and "| 1.1 |" in md and "| -1 |" in md
    assert "Points that miss the goal" in md
    for path in plot(f, rows):
        assert path.is_file() and path.stat().st_size > 1000


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--parts", "sweep,nope"], "unknown --parts"),
    (["--attacks", "scaling,bogus"], "unknown --attacks"),
    (["--data", "/nonexistent/corpus.txt"], "corpus not found"),
])
def test_cli_rejects_bad_flags(argv: list[str], fragment: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=fragment):
        main([*argv, "--out", str(tmp_path), "--cache", str(tmp_path / "c"), "--render-only"])
