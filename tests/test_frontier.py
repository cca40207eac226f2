"""The detect-or-harmless frontier (sentinel.sim.frontier) on a swarm small enough for CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.sim.frontier import (
    NOISE,
    FrontierConfig,
    Point,
    breakeven_flag_share,
    main,
    plan,
    plot,
    points,
    render,
)
from sentinel.sim.table import execute
from sentinel.verifier.strikes import StrikeLedger


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
    for p in points(rows, "sweep"):
        assert (p.cause() == "") == p.meets_goal  # every miss, and only a miss, gets a cause
        if not p.meets_goal:
            assert p.cause() in md
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


def _point(**kw) -> Point:
    base = dict(attack="bias", value=0.1, direction="forward", recall=0.5, f1=0.6, honest_bans=0,
                damage=0.04, damage_undefended=0.03, flagged=0.05, attackers=45, stages=16, attack_start=20,
                honest_flag_rate=0.02, clean_honest_flag_rate=0.019, breakeven=breakeven_flag_share(5, 50),
                latency=6.0)
    base.update(kw)
    return Point(**base)


@pytest.mark.parametrize(("limit", "after"), [(5, 50), (3, 100), (2, 3), (4, 7)])
def test_breakeven_share_matches_the_strike_ledger(limit: int, after: int) -> None:
    """Just above the break-even share a steady flagger is banned; just below it never is (a
    limit of 2 or more: below the share every flag is forgiven before the next one)."""
    f = breakeven_flag_share(limit, after)
    for share, banned in ((f * 1.15, True), (f * 0.85, False)):
        ledger, acc, state = StrikeLedger(limit, after), 0.0, None
        for _ in range(20000):  # flags spread evenly at the given share, never in a run
            acc += share
            state = ledger.record("w", acc >= 1.0)
            acc -= acc >= 1.0
            if state.banned:
                break
        assert state is not None and state.banned is banned, (share, f)


def test_cause_names_end_stage_attackers_under_the_fences() -> None:
    p = _point(missed=("s00r01", "s15r04"), flagged=0.03)
    assert not p.meets_goal
    c = p.cause()
    assert "2 of 45 attackers never banned are all on the first or last stage" in c
    assert "under the fences: 3.0% of attacked messages flagged, below the 9.1%" in c
    assert "worse than no defence" not in c


def test_cause_counts_middle_stage_misses_and_reports_latency_when_flagged_often() -> None:
    c = _point(missed=("s00r01", "s07r02", "s08r00"), flagged=0.4).cause()
    assert "3 of 45 attackers never banned (1 on the first or last stage)" in c
    assert "40.0% of attacked messages flagged in all" in c and "latency 6.0 steps" in c


def test_cause_names_honest_bans_and_a_defence_worse_than_none() -> None:
    p = _point(honest_bans=2, honest_banned=(("s15r02", 34), ("s03r01", 12)), damage=0.12,
               damage_undefended=0.05, substituted=300, honest_flag_rate=0.3, missed=("s05r01",))
    c = p.cause()
    assert "s15r02 (last stage, step 34)" in c and "s03r01 (stage 3, step 12)" in c
    assert "1 before the attack began" in c
    assert "honest flag rate 30.0% against 1.9% on the clean run" in c
    assert "did worse than no defence (+12.0% against +5.0%): 300 micro-batches" in c


def test_cause_marks_damage_inside_clean_run_noise_and_is_empty_for_a_met_goal() -> None:
    assert f"within the ~{NOISE:.0%} spread" in _point(damage=0.015, missed=("s04r00",)).cause()
    assert "spread between clean runs" not in _point(damage=0.05, missed=("s04r00",)).cause()
    assert _point(recall=0.95).cause() == "" and _point(damage=0.005).cause() == ""
    assert _point(recall=0.95, honest_bans=1, honest_banned=(("s01r00", 30),)).cause() != ""
