"""The detect-or-harmless frontier (sentinel.sim.frontier) on a swarm small enough for CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.sim.frontier import (
    NOISE,
    FrontierConfig,
    Point,
    _miss_line,
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
    pts = points(rows, "sweep")
    misses = [p for p in pts if not p.meets_goal]
    assert all(p.cause() for p in misses) and not any(p.cause() for p in pts if p.meets_goal)
    assert all(p.cause() in md for p in misses) and ("- none" in md) == (not misses)
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
    """A defended point of a 16-stage run with 45 scored attackers; recall follows ``missed``."""
    base = dict(attack="bias", value=0.1, direction="forward", f1=0.6, honest_bans=0,
                damage=0.04, damage_undefended=0.03, flagged=0.05, attackers=45, stages=16, attack_start=20,
                honest_flag_rate=0.02, clean_honest_flag_rate=0.019, latency=6.0)
    base.update(kw)
    base.setdefault("recall", 1 - len(base.get("missed", ())) / base["attackers"])
    base["honest_bans"] = len(base.get("honest_banned", ()))
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


def test_cause_names_end_stage_attackers_never_banned() -> None:
    missed = tuple(f"s{s:02d}r0{r}" for s in (0, 15) for r in (1, 3, 5))  # recall 39/45 = 0.87
    p = _point(missed=missed, flagged=0.03)
    assert not p.meets_goal
    c = p.cause()
    assert "the 6 of 45 attackers never banned are all on the first or last stage" in c
    assert "3.0% of attacked messages flagged, all attackers pooled; mean ban latency 6.0 steps" in c
    assert "did worse than the undefended" not in c


def test_cause_counts_middle_stage_misses() -> None:
    missed = ("s00r01", *(f"s{s:02d}r02" for s in range(3, 12)))
    c = _point(missed=missed, flagged=0.4).cause()
    assert "10 of 45 attackers never banned (1 on the first or last stage)" in c
    assert "40.0% of attacked messages flagged" in c
    assert "no attacker banned" in _point(missed=missed, latency=None).cause()


def test_cause_names_honest_bans_in_ban_order_and_a_defence_worse_than_none() -> None:
    p = _point(honest_banned=(("s03r01", 12), ("s15r02", 34)), damage=0.12, damage_undefended=0.05,
               substituted=300, honest_flag_rate=0.3, missed=tuple(f"s05r0{r}" for r in range(6)))
    c = p.cause()
    assert "honest banned: s03r01 (stage 3, step 12), s15r02 (last stage, step 34); 1 before the attack" in c
    assert "unattacked messages flagged 30.0% (clean run 1.9%)" in c
    assert "did worse than the undefended one (+12.0% against +5.0%), with 300 hops substituted" in c


def test_cause_marks_damage_inside_clean_run_noise_and_is_empty_for_a_met_goal() -> None:
    missed = tuple(f"s04r0{r}" for r in range(6))
    assert f"within the {NOISE:.1%} range of clean runs" in _point(damage=0.012, missed=missed).cause()
    assert "range of clean runs" not in _point(damage=0.05, missed=missed).cause()
    assert _point(missed=("s04r00",)).cause() == ""  # recall 0.98: caught
    assert _point(damage=0.005, missed=missed).cause() == ""  # harmless
    assert _point(honest_banned=(("s01r00", 30),)).cause().startswith("honest banned: s01r00")


def test_a_miss_is_rendered_with_its_cause(swept) -> None:
    f, rows = swept
    md = render(f, rows, 0.0, "pytest")
    p = _point(missed=tuple(f"s04r0{r}" for r in range(6)))
    assert _miss_line("bias bias=0.1 forward", p) == (
        f"- **bias bias=0.1 forward**: {p.miss_reason()}. Cause: {p.cause()}.")
    assert "forgiven faster than it is struck" in md  # the scale for the flagged shares
