"""The detect-or-harmless frontier: every parametric attack swept from harmless to obvious.

    python bench/frontier.py                 # the full sweep at 16 x 8 (results/frontier.md + PNGs)
    python bench/frontier.py --smoke         # a reduced sweep (4 x 4, 3 strengths) for a quick look

A detector that catches strong attacks and ignores weak ones is only useful if nothing in between
does real damage. Each attack below is swept over eight strengths, weakest to strongest, in both
directions, undefended and defended, on the detection table's swarm (16 x 8, 37.5 % malicious, the
tiny model, lr 3e-3, 80 steps, attack from step 20). A point reports the defended run's recall, F1
and honest bans, and the *damage*: final validation loss relative to the clean run of the same
defense (so the defense's own cost is not counted as damage). The goal per point: recall >= 0.9
or defended damage <= 1 %; points that miss are listed with their cause (:meth:`Point.cause`).

The ``lazy`` and ``adaptive`` parts add the lazy workers of :mod:`sentinel.attacks.lazy` and the
adaptive attackers (``ema_mimic``, ``white_box``) over a run ``long_factor`` times as long, to see
what riding under the fences adds up to. Runs are cached as the detection table's (keyed by full
configuration), so a sweep resumes where it stopped and shares the table's clean runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sentinel.run.screening import ScreeningConfig
from sentinel.sim.swarm import SimConfig
from sentinel.sim.table import (
    REPO,
    SHARED_DATA,
    Row,
    _code_versions,
    _f,
    _rate,
    execute,
    load_cached,
    parse_parts,
    screening_line,
)

#: attack -> (parameter, strengths from weakest to strongest). Scaling is ordered by how far the
#: factor is from 1 (0 = zeros, -1 = sign flip); the rest grow monotonically.
SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "scaling": ("factor", (1.1, 0.9, 1.5, 0.5, 2.0, 0.0, -1.0, 10.0)),
    "gaussian": ("sigma", (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 3.0)),
    "bias": ("bias", (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)),
    "invisible": ("eps", (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3)),
    "element_flip": ("fraction", (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)),
    "intermittent": ("p", (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)),
    "delay": ("k", (1, 2, 3, 5, 10, 20, 40, 60)),
    "alie": ("z", (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)),
    "slow_ramp": ("rate", (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)),
}
LAZY: tuple[str, ...] = ("lazy_skip", "lazy_stale", "lazy_random", "lazy_partial")
ADAPTIVE: tuple[str, ...] = ("ema_mimic", "white_box")
PARTS = ("sweep", "lazy", "adaptive")
DIRECTIONS = ("forward", "backward")
#: the goal of a point: recall at least this, or damage at most ``HARMLESS``
RECALL_GOAL = 0.9
HARMLESS = 0.01
#: the range of the clean undefended val loss over three seeds on the sweep's swarm and 80-step
#: budget (``results/detection_table.md``, "Clean runs"): damage below it is not
#: evidence of harm (a three-seed range understates the spread, so this is the generous side)
NOISE = 0.015


def spec(attack: str, param: str, value: float) -> str:
    return f"{attack},{param}={value:g}"


@dataclass
class FrontierConfig:
    """What the sweep runs; defaults are the recorded configuration of ``results/frontier.md``
    (the detection table's swarm and budget)."""

    stages: int = 16
    replicas: int = 8
    malicious_fraction: float = 0.375
    steps: int = 80
    micro_batches_per_step: int = 8
    attack_start: int = 20
    model_size: str = "tiny"
    lr: float = 3e-3
    eval_every: int = 20
    seed: int = 0
    #: the adaptive part runs this many times ``steps`` (its attack start scaled alike)
    long_factor: int = 3
    data: str = str(SHARED_DATA / "tinyshakespeare.txt")
    #: ScreeningConfig overrides; empty: the library defaults, what users run
    screening: dict[str, Any] = field(default_factory=dict)
    sweeps: dict[str, tuple[str, tuple[float, ...]]] = field(default_factory=lambda: dict(SWEEPS))
    parts: tuple[str, ...] = PARTS
    out: Path = REPO / "results"
    cache: Path = REPO / "runs" / "detection_table"
    #: output names (``frontier.md``, ``frontier_recall.png``, ``frontier_damage.png``)
    name: str = "frontier"

    def sim(self, **kw: Any) -> SimConfig:
        base = dict(stages=self.stages, replicas=self.replicas, malicious_fraction=self.malicious_fraction,
                    steps=self.steps, micro_batches_per_step=self.micro_batches_per_step,
                    attack_start=self.attack_start, model_size=self.model_size, lr=self.lr,
                    eval_every=self.eval_every, seed=self.seed, data=self.data, screening=dict(self.screening))
        base.update(kw)
        if base.get("defense") == "none":
            base["screening"] = {}  # unused undefended: one run serves every screening config
        return SimConfig(**base)


def smoke(out: Path | None = None, cache: Path | None = None) -> FrontierConfig:
    """The reduced sweep: 4 x 4 (one attacker per stage), 24 steps, three strengths per attack
    (weakest, middle, strongest); ``--smoke`` runs it in a few minutes on two cores."""
    d = FrontierConfig()
    sweeps = {a: (p, (v[0], v[len(v) // 2], v[-1])) for a, (p, v) in SWEEPS.items()}
    return replace(d, stages=4, replicas=4, malicious_fraction=0.25, steps=24, micro_batches_per_step=4,
                   attack_start=8, eval_every=8, sweeps=sweeps, long_factor=2, name="frontier_smoke",
                   out=out or d.out, cache=cache or d.cache)


def plan(f: FrontierConfig) -> list[Row]:
    rows: list[Row] = []
    for d in ("none", "sentinel"):
        rows.append(Row("clean", f"clean/{d}", f.sim(attack="none", defense=d)))
    if "sweep" in f.parts:
        for attack, (param, values) in f.sweeps.items():
            for v in values:
                for direction in DIRECTIONS:
                    for d in ("none", "sentinel"):
                        rows.append(Row("sweep", f"{spec(attack, param, v)}/{direction}/{d}",
                                        f.sim(attack=spec(attack, param, v), direction=direction, defense=d)))
    if "lazy" in f.parts:
        for attack in LAZY:
            for direction in DIRECTIONS:
                for d in ("none", "sentinel"):
                    rows.append(Row("lazy", f"{attack}/{direction}/{d}",
                                    f.sim(attack=attack, direction=direction, defense=d)))
    if "adaptive" in f.parts:
        long = dict(steps=f.steps * f.long_factor, attack_start=f.attack_start * f.long_factor)
        for d in ("none", "sentinel"):
            rows.append(Row("adaptive", f"clean/{d}", f.sim(attack="none", defense=d, **long)))
        for attack in ADAPTIVE:
            for direction in DIRECTIONS:
                for d in ("none", "sentinel"):
                    rows.append(Row("adaptive", f"{attack}/{direction}/{d}",
                                    f.sim(attack=attack, direction=direction, defense=d, **long)))
    return rows


# -- scoring ----------------------------------------------------------------------------------------


@dataclass
class Point:
    """One attack x strength x direction: the defended run against its undefended twin.

    Besides the scores it keeps the facts :meth:`cause` needs to say *why* a point misses the
    goal, read from the runs' reports, so the explanation is re-derived on every re-run instead
    of written by hand against one run's numbers.
    """

    attack: str
    value: float | None
    direction: str
    recall: float | None
    f1: float | None
    honest_bans: int
    damage: float | None  # defended, relative to the clean defended run
    damage_undefended: float | None  # relative to the clean undefended run
    flagged: float | None  # share of attacked messages flagged
    #: scored attackers the defended run never banned
    missed: tuple[str, ...] = ()
    #: scored attackers in all
    attackers: int = 0
    #: honest workers banned, with the step of the ban
    honest_banned: tuple[tuple[str, int | None], ...] = ()
    stages: int = 0
    attack_start: int = 0
    #: share of unattacked messages flagged in this run and in the clean defended run
    honest_flag_rate: float | None = None
    clean_honest_flag_rate: float | None = None
    #: hops that went on with the reference in place of a flagged tensor
    substituted: int = 0
    #: mean steps from the attack's start to an attacker's ban
    latency: float | None = None

    @property
    def caught(self) -> bool:
        return self.recall is not None and self.recall >= RECALL_GOAL

    @property
    def harmless(self) -> bool:
        return self.damage is not None and self.damage <= HARMLESS

    @property
    def meets_goal(self) -> bool:
        return (self.caught or self.harmless) and self.honest_bans == 0

    def miss_reason(self) -> str:
        parts = []
        if self.honest_bans:
            parts.append(f"{self.honest_bans} honest ban(s)")
        if not (self.caught or self.harmless):
            parts.append(f"recall {_f(self.recall, 2)} and damage {_pct(self.damage)} "
                         f"(undefended {_pct(self.damage_undefended)})")
        return "; ".join(parts)

    def cause(self) -> str:
        """Why the point misses, as measured facts: who was banned wrongly (where, when) or never
        (how many on the end stages), how often attacked messages were flagged and how fast the
        bans came, whether the defended run did worse than the undefended one, and whether the
        damage is inside clean-run noise. Facts that go together, not a proof of mechanism."""
        if self.meets_goal:
            return ""
        out: list[str] = []
        if self.honest_banned:
            who = ", ".join(f"{w} ({_stage_kind(w, self.stages) or f'stage {_stage_of(w)}'}, step {s})"
                            for w, s in self.honest_banned)
            before = sum(1 for _, s in self.honest_banned if s is not None and s < self.attack_start)
            note = f"; {before} before the attack began" if before else ""
            out.append(f"honest banned: {who}{note}; unattacked messages flagged {_rate(self.honest_flag_rate)} "
                       f"(clean run {_rate(self.clean_honest_flag_rate)})")
        if not (self.caught or self.harmless):
            ends = [w for w in self.missed if _stage_kind(w, self.stages)]
            if self.missed and len(ends) == len(self.missed):
                out.append(f"the {len(self.missed)} of {self.attackers} attackers never banned are all on the "
                           "first or last stage, which are screened without the gain and skip statistics")
            elif self.missed:
                out.append(f"{len(self.missed)} of {self.attackers} attackers never banned "
                           f"({len(ends)} on the first or last stage)")
            if self.flagged is not None:
                bans = (f"mean ban latency {_f(self.latency, 1)} steps" if self.latency is not None
                        else "no attacker banned")
                out.append(f"{_rate(self.flagged)} of attacked messages flagged, all attackers pooled; {bans}")
            if (self.damage is not None and self.damage_undefended is not None
                    and self.damage > self.damage_undefended + NOISE):
                rate = ("" if self.honest_banned else f" and unattacked messages flagged "
                        f"{_rate(self.honest_flag_rate)} (clean run {_rate(self.clean_honest_flag_rate)})")
                out.append(f"the defended run did worse than the undefended one ({_pct(self.damage)} against "
                           f"{_pct(self.damage_undefended)}), with {self.substituted} hops substituted{rate}")
            if self.damage is not None and self.damage <= NOISE:
                out.append(f"the damage is within the {NOISE:.1%} range of clean runs over three seeds")
        return "; ".join(out)


def breakeven_flag_share(strike_limit: int, forgive_after: int) -> float:
    """The flagged share of a worker's messages above which its strikes grow without bound.

    Each flag adds one strike and each clean message forgives ``strike_limit / forgive_after``
    (:class:`sentinel.verifier.strikes.StrikeLedger`), so at flagged share ``f`` the strikes drift
    by ``f - (1 - f) * r`` per message, ``r = strike_limit / forgive_after``: positive only for
    ``f > r / (1 + r)``. Below it an attacker is banned only by a run of flags in a row.
    """
    r = strike_limit / forgive_after
    return r / (1 + r)


def _forgiveness_note(screening: dict[str, Any]) -> str:
    cfg = ScreeningConfig.from_dict(screening)
    limit, after = cfg.strike_limit, cfg.forgive_after
    if limit < 2:
        return ""
    return (f" For scale: with {limit} strikes to a ban and full forgiveness after {after} clean messages, a "
            f"worker whose confirmed flags stay under {breakeven_flag_share(limit, after):.1%} of its screened "
            "messages, spread out, is forgiven faster than it is struck.")


def _stage_of(worker: str) -> int | None:
    m = re.match(r"s(\d+)r\d+$", worker)
    return int(m.group(1)) if m else None


def _stage_kind(worker: str, stages: int) -> str:
    """``"first stage"`` / ``"last stage"`` for a worker on an end stage, else ``""``."""
    s = _stage_of(worker)
    if s == 0:
        return "first stage"
    if s is not None and s == stages - 1:
        return "last stage"
    return ""


def _rel(v: float | None, ref: float | None) -> float | None:
    if ref is None:
        return None
    if v is None or not math.isfinite(v):
        return math.inf
    return (v - ref) / ref


def _pct(v: float | None) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "diverged"
    return f"{100 * v:+.1f}%"


def points(rows: list[Row], part: str, clean_part: str = "clean") -> list[Point]:
    """Score every (attack, strength, direction) of ``part`` that has both runs."""
    reports = {(r.part, r.label): r.report for r in rows if r.report is not None}
    clean_reports = {d: reports.get((clean_part, f"clean/{d}")) or {} for d in ("none", "sentinel")}
    clean = {d: rep.get("val_loss_final") for d, rep in clean_reports.items()}
    out: list[Point] = []
    for r in rows:
        if r.part != part or not r.label.endswith("/sentinel") or r.label.startswith("clean/"):
            continue
        name, direction, _ = r.label.rsplit("/", 2)
        dfd, und = reports.get((part, r.label)), reports.get((part, f"{name}/{direction}/none"))
        if dfd is None or und is None:
            continue
        attack, _, kv = name.partition(",")
        value = float(kv.split("=", 1)[1]) if kv else None
        banned = {b["worker"]: b["step"] for b in dfd.get("banned", [])}
        scored = dfd.get("malicious_scored", [])
        honest_set = set(dfd["honest_banned"])
        out.append(Point(
            attack, value, direction, dfd["recall"], dfd["f1"], len(dfd["honest_banned"]),
            _rel(dfd["val_loss_final"], clean["sentinel"]), _rel(und["val_loss_final"], clean["none"]),
            dfd.get("flag_rate_attacked"),
            missed=tuple(w for w in scored if w not in banned), attackers=len(scored),
            # the report's meaning, in ban order: a worker that sent no attacked tensor (an attacker
            # on stage 0 of a backward attack has none to send) and was banned counts as honest
            honest_banned=tuple((b["worker"], b["step"]) for b in dfd.get("banned", [])
                                if b["worker"] in honest_set),
            stages=dfd["config"]["stages"], attack_start=dfd["config"]["attack_start"],
            honest_flag_rate=dfd.get("flag_rate_honest"),
            clean_honest_flag_rate=clean_reports["sentinel"].get("flag_rate_honest"),
            substituted=(dfd.get("micro_batches") or {}).get("substituted", 0),
            latency=dfd.get("detection_latency_steps")))
    return out


# -- rendering --------------------------------------------------------------------------------------


def _point_cells(p: Point | None) -> str:
    if p is None:
        return "| - | - | - | - | - |"
    mark = "yes" if p.meets_goal else "**no**"
    return (f"| {_f(p.recall, 2)} | {p.honest_bans} | {_pct(p.damage)} | {_pct(p.damage_undefended)} "
            f"| {mark} |")


def render(f: FrontierConfig, rows: list[Row], seconds: float, command: str) -> str:
    sweep = points(rows, "sweep")
    first = next((r.report for r in rows if r.report is not None), None)
    clean = {r.label: r.report for r in rows if r.part == "clean" and r.report is not None}
    lines = [
        "# Detect-or-harmless frontier",
        "",
        f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `{command}` "
        f"({seconds / 60:.0f} min wall time in this invocation; cached runs are reused).",
        f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
        f"{first['machine']['torch'] if first else '?'}, 1 thread per run. Code: {_code_versions(rows)}.",
        "",
        f"Swarm: {f.stages} x {f.replicas}, {math.floor(f.malicious_fraction * f.replicas + 1e-9)} malicious per "
        f"stage ({f.malicious_fraction:.1%}, first and last stages included), one verifier. Model `{f.model_size}`, "
        f"lr {f.lr}, {f.steps} steps x {f.micro_batches_per_step} micro-batches, attack from step "
        f"{f.attack_start}. Data `{Path(f.data).name}`. Screening: {screening_line(f.screening)}.",
        "",
        "Damage = final validation loss minus the clean run's of the same defense, relative to it "
        f"(clean: undefended {_f((clean.get('clean/none') or {}).get('val_loss_final'))}, "
        f"defended {_f((clean.get('clean/sentinel') or {}).get('val_loss_final'))}). "
        f"Goal per point: recall >= {RECALL_GOAL} or defended damage <= {HARMLESS:.0%}, with no honest ban. "
        f"Clean runs over three seeds span {NOISE:.1%} on this budget "
        "(`results/detection_table.md`), so damages inside that range are not evidence of harm. "
        "Every point that misses the goal is listed with its cause, derived from the runs' reports: who "
        "was banned wrongly (where, when) or never (how many on the end stages, which are screened without "
        "the gain and skip statistics), how often attacked messages were flagged and how fast the bans "
        "came, and whether the defended run did worse than the undefended one."
        + _forgiveness_note(f.screening),
        "",
    ]
    if sweep:
        met = sum(p.meets_goal for p in sweep)
        lines += [f"## Strength sweep: {met} of {len(sweep)} points meet the goal", ""]
        lines += ["![recall](frontier_recall.png)" if f.name == "frontier" else "", ""]
        for attack, (param, values) in f.sweeps.items():
            lines += [f"### {attack} ({param})", "",
                      f"| {param} | fwd recall | fwd honest bans | fwd damage | fwd undefended | fwd goal "
                      "| bwd recall | bwd honest bans | bwd damage | bwd undefended | bwd goal |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for v in values:
                cells = [next((p for p in sweep if p.attack == attack and p.value == float(v)
                               and p.direction == d), None) for d in DIRECTIONS]
                lines.append(f"| {v:g} " + _point_cells(cells[0]) + _point_cells(cells[1])[1:])
            lines.append("")
        misses = [p for p in sweep if not p.meets_goal]
        lines += ["### Points that miss the goal", ""]
        lines += [_miss_line(f"{p.attack} {SWEEPS.get(p.attack, ('?',))[0]}={p.value:g} {p.direction}", p)
                  for p in misses] or ["- none"]
        lines.append("")
    for part, title in (("lazy", "Lazy workers"), ("adaptive", f"Adaptive attackers, {f.long_factor}x longer runs")):
        pts = points(rows, part, clean_part="clean" if part == "lazy" else "adaptive")
        if not pts:
            continue
        lines += [f"## {title}", "",
                  "| attack | dir | recall | F1 | honest bans | attacked msgs flagged | damage | undefended damage "
                  "| goal |", "|---|---|---|---|---|---|---|---|---|"]
        for p in pts:
            lines.append(f"| {p.attack} | {p.direction} | {_f(p.recall, 2)} | {_f(p.f1, 2)} | {p.honest_bans} "
                         f"| {_rate(p.flagged)} | {_pct(p.damage)} "
                         f"| {_pct(p.damage_undefended)} | {'yes' if p.meets_goal else '**no**'} |")
        lines += ["", *[_miss_line(f"{p.attack} {p.direction}", p) for p in pts if not p.meets_goal], ""]
    return "\n".join(lines).rstrip() + "\n"


def _miss_line(name: str, p: Point) -> str:
    return f"- **{name}**: {p.miss_reason()}. Cause: {p.cause()}."


def plot(f: FrontierConfig, rows: list[Row]) -> list[Path]:
    """Recall vs strength and damage vs strength, one panel per attack (defended vs undefended)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = points(rows, "sweep")
    if not sweep:
        return []
    attacks = list(f.sweeps)
    cols = 3
    nrows = math.ceil(len(attacks) / cols)
    written = []
    for what in ("recall", "damage"):
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
        for ax, attack in zip(axes.flat, attacks, strict=False):
            param, values = f.sweeps[attack]
            xs = range(len(values))
            for direction, colour in (("forward", "tab:blue"), ("backward", "tab:orange")):
                pts = {p.value: p for p in sweep if p.attack == attack and p.direction == direction}
                row = [pts.get(float(v)) for v in values]
                if what == "recall":
                    ax.plot(xs, [p.recall if p else math.nan for p in row], "o-", color=colour, label=direction)
                else:
                    ax.plot(xs, [100 * _cap(p.damage) if p else math.nan for p in row], "o-", color=colour,
                            label=f"{direction}, sentinel")
                    ax.plot(xs, [100 * _cap(p.damage_undefended) if p else math.nan for p in row], "x--",
                            color=colour, alpha=0.6, label=f"{direction}, undefended")
            if what == "recall":
                ax.axhline(RECALL_GOAL, color="grey", lw=0.8, ls=":")
                ax.set_ylim(-0.05, 1.05)
            else:
                ax.axhline(100 * HARMLESS, color="grey", lw=0.8, ls=":")
            ax.set_xticks(list(xs), [f"{v:g}" for v in values], fontsize=7)
            ax.set_title(f"{attack} ({param}, weak -> strong)", fontsize=9)
        for ax in list(axes.flat)[len(attacks):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.supylabel("recall of the defended run" if what == "recall"
                      else "damage: val loss vs clean (%), capped at 30")
        fig.tight_layout()
        path = f.out / f"{f.name}_{what}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def _cap(v: float | None) -> float:
    if v is None:
        return math.nan
    return min(v, 0.30)


def build_parser() -> argparse.ArgumentParser:
    d = FrontierConfig()
    p = argparse.ArgumentParser(prog="python bench/frontier.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="the reduced sweep (4 x 4, 24 steps, 3 strengths)")
    p.add_argument("--parts", default=",".join(d.parts), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--attacks", default=",".join(SWEEPS), help="swept attacks, comma-separated")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", default=d.data)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--cache", type=Path, default=d.cache)
    p.add_argument("--render-only", action="store_true", help="run nothing: render the cached runs")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="simulations in parallel, one thread each (default: one per core)")
    return p


def main(argv: list[str] | None = None, prog: str = "python bench/frontier.py") -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    parser.prog = prog
    a = parser.parse_args(argv)
    parts = parse_parts(a.parts, PARTS)
    chosen = [x.strip() for x in a.attacks.split(",") if x.strip()]
    bad = sorted(set(chosen) - set(SWEEPS))
    if bad:
        raise SystemExit(f"unknown --attacks {bad}; choose from {', '.join(SWEEPS)}")
    f = smoke(a.out, a.cache) if a.smoke else FrontierConfig(out=a.out, cache=a.cache)
    f = replace(f, parts=parts, seed=a.seed, data=a.data, sweeps={k: f.sweeps[k] for k in chosen})
    if not Path(f.data).is_file():
        raise SystemExit(f"corpus not found: {f.data} (the sweep reads ../shared/data beside the repo; pass --data)")
    rows = plan(f)
    print(f"{len(rows)} runs planned", file=sys.stderr)
    if a.render_only:
        load_cached(rows, f.cache)
        seconds = 0.0
    else:
        seconds = execute(rows, f.cache, jobs=max(1, a.jobs))
    f.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([prog, *argv])
    md = f.out / f"{f.name}.md"
    md.write_text(render(f, rows, seconds, command))
    written = [md, *plot(f, rows)]
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
