"""The detection table: every attack x {forward, backward} x {none, sentinel} at 16 x 8, and more.

    sentinel-sim --table                      # or: python bench/detection_table.py
    sentinel-sim --table --parts matrix       # only the 128-worker matrix

Parts (all by default):

* ``matrix`` — the clean run (undefended and defended) and every built-in attack in both
  directions, undefended and defended, at ``stages x replicas`` with ``malicious_fraction``;
* ``lu`` — Lu et al.'s protocol: forward sign flip and backward Gaussian replacement on 30 % and
  70 % of a malicious worker's messages;
* ``wide`` — the headline rows at 16 x 11 (176 workers, 4 malicious per stage = 36.4 %);
* ``cost`` — ``sentinel`` vs ``duplicate`` (Lu et al.) on the same run: tokens/s and compute;
* ``wikitext`` — the headline rows on wikitext-2 with the same defaults (no re-tuning);
* ``noise`` — the clean undefended run with other seeds, to say what "within 1 %" can mean;
* ``averaging`` — attackers honest on the pipeline that poison their stage's average
  (``sentinel.attacks.averaging``), with plain mean vs CenteredClip, against the clean run of each.

Each run's report is cached under ``--cache`` (keyed by its full configuration), so an
interrupted table resumes where it stopped and a re-run only re-renders. Results go to
``results/detection_table.md`` and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sentinel.run.screening import ScreeningConfig
from sentinel.sim.swarm import SimConfig, run_simulation

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"

#: The attack specs of the table: every built-in, with the parameter that makes it a distinct row
#: where the default would duplicate another (``scaling`` defaults to -1, i.e. ``sign_flip``).
ATTACKS: tuple[str, ...] = (
    "zeros",
    "constant",
    "random",
    "scaling,factor=10",
    "sign_flip",
    "gaussian",
    "bias",
    "delay",
    "invisible",
    "element_flip",
    "intermittent",  # sign flip on 25 % of messages
    "slow_ramp",
    "alie",
    "ema_mimic",
    "collusion",  # all attackers push one shared direction (scale 0.5)
)

#: Rows repeated at 16 x 11 and on wikitext-2 (attack spec, direction).
HEADLINE: tuple[tuple[str, str], ...] = (
    ("sign_flip", "forward"),
    ("random", "forward"),
    ("gaussian", "backward"),
    ("scaling,factor=10", "backward"),
    ("ema_mimic", "forward"),
)

#: Lu et al.'s protocol (arXiv 2312.00843): forward sign flip and backward replacement by Gaussian
#: noise of the same scale, each on a share (the attack rate) of a malicious worker's messages.
LU_RATES: tuple[float, ...] = (0.3, 0.7)
LU: tuple[tuple[str, str], ...] = tuple(
    (f"intermittent,inner={inner},p={rate}", direction)
    for inner, direction in (("sign_flip", "forward"), ("random", "backward")) for rate in LU_RATES)

#: Attacks on within-stage averaging (honest on the pipeline), run with each aggregation rule.
AVERAGING_ATTACKS: tuple[str, ...] = ("avg_scaling", "avg_random", "avg_alie")
AVERAGING_RULES: tuple[str, ...] = ("mean", "centered-clip")

PARTS = ("matrix", "lu", "wide", "cost", "wikitext", "noise", "averaging")


@dataclass
class TableConfig:
    """What the table runs. Defaults are the recorded configuration of ``results/``.

    ``steps`` / ``micro_batches_per_step`` / ``model_size`` are budgeted so the whole table
    (about 80 runs) fits in an hour on two cores; ``attack_start`` leaves the swarm an honest
    start, as in the paper (the model is learning fastest then, and the screens calibrate).
    """

    stages: int = 16
    replicas: int = 8
    malicious_fraction: float = 0.375
    wide_replicas: int = 11
    wide_fraction: float = 4 / 11
    steps: int = 80
    micro_batches_per_step: int = 8
    attack_start: int = 20
    model_size: str = "tiny"
    #: The tiny 16-layer model's own rate, not the live swarm's default (1e-3, tuned for the
    #: 3-stage base model): at 1e-3 this model has barely started learning after the table's 80
    #: steps, so attacks would be judged on a model that has not learnt anything yet.
    lr: float = 3e-3
    eval_every: int = 20
    seed: int = 0
    noise_seeds: tuple[int, ...] = (1, 2)
    data: str = str(SHARED_DATA / "tinyshakespeare.txt")
    wikitext: str = str(SHARED_DATA / "wikitext-2-valid.txt")
    #: ScreeningConfig overrides; empty: the library defaults, what users run
    screening: dict[str, Any] = field(default_factory=dict)
    attacks: tuple[str, ...] = ATTACKS
    parts: tuple[str, ...] = PARTS
    out: Path = REPO / "results"
    cache: Path = REPO / "runs" / "detection_table"

    def sim(self, **kw: Any) -> SimConfig:
        base = dict(stages=self.stages, replicas=self.replicas, malicious_fraction=self.malicious_fraction,
                    steps=self.steps, micro_batches_per_step=self.micro_batches_per_step,
                    attack_start=self.attack_start, model_size=self.model_size, lr=self.lr,
                    eval_every=self.eval_every,
                    seed=self.seed, data=self.data, screening=dict(self.screening))
        base.update(kw)
        return SimConfig(**base)


@dataclass
class Row:
    """One run of the table and its report."""

    part: str
    label: str
    cfg: SimConfig
    report: dict[str, Any] | None = None


def plan(t: TableConfig) -> list[Row]:
    """Every run of the requested parts, in execution order."""
    rows: list[Row] = []

    def add(part: str, label: str, **kw: Any) -> None:
        if kw.get("defense") == "none":
            kw["screening"] = {}  # not used undefended: the same run serves every screening config
        rows.append(Row(part, label, t.sim(**kw)))

    def block(part: str, attacks: Iterable[tuple[str, str]], defenses: tuple[str, ...] = ("none", "sentinel"),
              **kw: Any) -> None:
        for d in defenses:
            add(part, f"clean/{d}", attack="none", defense=d, **kw)
        # The swarm a defended run ends with: the attackers banned, only the honest replicas left
        # (fewer replicas per stage = more optimizer steps each per verifier step, which trains
        # faster at this budget): the fair reference for "defended within 1 % of clean".
        replicas = kw.get("replicas", t.replicas)
        bad = math.floor(kw.get("malicious_fraction", t.malicious_fraction) * replicas + 1e-9)
        add(part, "clean-honest/none", attack="none", defense="none",
            **{**kw, "replicas": replicas - bad, "malicious_fraction": 0.0})
        for attack, direction in attacks:
            for d in defenses:
                add(part, f"{attack}/{direction}/{d}", attack=attack, direction=direction, defense=d, **kw)

    if "matrix" in t.parts:
        block("matrix", [(a, d) for a in t.attacks for d in ("forward", "backward")])
    if "lu" in t.parts:
        block("lu", LU)
    if "wide" in t.parts:
        # as many micro-batches in flight as replicas: every worker still serves ~1 per step
        block("wide", HEADLINE, replicas=t.wide_replicas, malicious_fraction=t.wide_fraction,
              micro_batches_per_step=t.micro_batches_per_step * t.wide_replicas // t.replicas)
    if "cost" in t.parts:
        for attack in ("none", "sign_flip"):
            for d in ("sentinel", "duplicate"):
                add("cost", f"{attack}/forward/{d}", attack=attack, direction="forward", defense=d)
    if "wikitext" in t.parts:
        block("wikitext", HEADLINE, data=t.wikitext)
    if "noise" in t.parts:
        for s in t.noise_seeds:
            add("noise", f"clean/none/seed{s}", attack="none", defense="none", seed=s)
    if "averaging" in t.parts:
        for rule in AVERAGING_RULES:
            add("averaging", f"clean/{rule}", attack="none", defense="sentinel", averaging=rule)
            for attack in AVERAGING_ATTACKS:
                add("averaging", f"{attack}/{rule}", attack=attack, defense="sentinel", averaging=rule)
    return rows


def _key(cfg: SimConfig) -> str:
    blob = json.dumps(cfg.to_dict(), sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=10).hexdigest()


def _code_versions(rows: list[Row]) -> str:
    """The code the runs were made with (stamped in each report when it ran), with counts."""
    seen: dict[str, int] = {}
    for r in rows:
        if r.report is not None:
            v = r.report.get("code", "unknown")
            seen[v] = seen.get(v, 0) + 1
    return ", ".join(f"{v} ({n} runs)" for v, n in seen.items()) if len(seen) > 1 else next(iter(seen), "unknown")


def load_cached(rows: list[Row], cache: Path) -> None:
    """Attach each row's cached report, if it has run (``--render-only``); runs nothing."""
    for row in rows:
        path = cache / f"{_key(row.cfg)}.json"
        row.report = json.loads(path.read_text()) if path.is_file() else None


def parse_parts(text: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """``--parts`` as a tuple, or a SystemExit naming the unknown ones."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = sorted(set(parts) - set(known))
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; choose from {', '.join(known)}")
    return parts


def execute(rows: list[Row], cache: Path, log: Any = sys.stderr, jobs: int = 1) -> float:
    """Run (or load from ``cache``) every row, ``jobs`` at a time; returns the wall seconds spent.

    Each simulation is single-threaded (``SimConfig.threads``), so ``jobs`` = number of cores
    is the efficient setting; runs are independent and deterministic, so the result does not
    depend on ``jobs``.
    """
    cache.mkdir(parents=True, exist_ok=True)
    todo: list[tuple[int, Row, Path]] = []
    for i, row in enumerate(rows, 1):
        path = cache / f"{_key(row.cfg)}.json"
        if path.is_file():
            row.report = json.loads(path.read_text())
        else:
            todo.append((i, row, path))
    t0 = time.perf_counter()

    def done(i: int, row: Row, path: Path, report: dict[str, Any]) -> None:
        row.report = report
        path.write_text(json.dumps(report))
        r = report
        print(f"[{i}/{len(rows)}] {row.part} {row.label}: val {_f(r['val_loss_final'])} F1 {_f(r['f1'], 2)} "
              f"lat {_f(r['detection_latency_steps'], 1)} honest bans {len(r['honest_banned'])} "
              f"({r.get('wall_seconds', 0):.0f}s)", file=log, flush=True)

    if jobs <= 1:
        for i, row, path in todo:
            done(i, row, path, run_simulation(row.cfg))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_simulation, row.cfg): (i, row, path) for i, row, path in todo}
            for fut in as_completed(futures):
                done(*futures[fut], fut.result())
    return time.perf_counter() - t0


# -- rendering ------------------------------------------------------------------------------------

def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _pct(v: float | None, ref: float | None) -> str:
    if v is None or ref is None:
        return "diverged" if ref is not None else "-"
    return f"{100.0 * (v - ref) / ref:+.1f}%"


def _rel(v: float | None, ref: float | None) -> float | None:
    if v is None or ref is None:
        return None
    return (v - ref) / ref


def _by(rows: list[Row], part: str) -> dict[str, dict[str, Any]]:
    return {r.label: r.report for r in rows if r.part == part and r.report is not None}


def _attack_table(reports: dict[str, dict[str, Any]], pairs: list[tuple[str, str]]) -> tuple[list[str], dict]:
    """Markdown rows (one per attack x direction) and the numbers the summary needs."""
    clean = reports.get("clean/none", {}).get("val_loss_final")
    honest = reports.get("clean-honest/none", {}).get("val_loss_final")
    lines = [
        "| attack | dir | undefended val (vs clean) | defended val (vs clean / vs honest-only clean) | F1 "
        "| precision | recall | latency mean / max (steps) | honest bans | honest flag rate | attacked msgs flagged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stats: dict[str, Any] = {"rows": []}
    for attack, direction in pairs:
        und = reports.get(f"{attack}/{direction}/none")
        dfd = reports.get(f"{attack}/{direction}/sentinel")
        if und is None or dfd is None:
            continue
        damage = _rel(und["val_loss_final"], clean) if und["val_loss_final"] is not None else math.inf
        kept = _rel(dfd["val_loss_final"], clean) if dfd["val_loss_final"] is not None else math.inf
        lines.append(
            f"| {attack} | {direction} | {_f(und['val_loss_final'])} ({_pct(und['val_loss_final'], clean)}) "
            f"| {_f(dfd['val_loss_final'])} ({_pct(dfd['val_loss_final'], clean)} / "
            f"{_pct(dfd['val_loss_final'], honest)}) | {_f(dfd['f1'], 2)} "
            f"| {_f(dfd['precision'], 2)} | {_f(dfd['recall'], 2)} "
            f"| {_f(dfd['detection_latency_steps'], 1)} / {_f(dfd['detection_latency_max_steps'])} "
            f"| {len(dfd['honest_banned'])} | {dfd['flag_rate_honest']:.2%} | {_rate(dfd['flag_rate_attacked'])} |"
        )
        kept_h = _rel(dfd["val_loss_final"], honest) if dfd["val_loss_final"] is not None else math.inf
        stats["rows"].append({"attack": attack, "direction": direction, "damage": damage, "kept": kept,
                              "kept_honest": kept_h,
                              "f1": dfd["f1"], "latency": dfd["detection_latency_steps"],
                              "honest_bans": len(dfd["honest_banned"])})
    return lines, stats


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _clean_lines(reports: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for label, what in (("clean/none", "clean run, undefended"), ("clean/sentinel", "clean run, sentinel"),
                        ("clean-honest/none", "clean run with only the honest replicas (attackers absent)")):
        r = reports.get(label)
        if r is None:
            continue
        c = r["config"]
        out.append(f"- {what} ({c['stages']} x {c['replicas']}): val loss {_f(r['val_loss_final'])}, honest bans "
                   f"{len(r['honest_banned'])}, honest flag rate {r['flag_rate_honest']:.2%}, "
                   f"{r['tokens_per_s']:.0f} tokens/s")
    return out


def _goals(stats: dict[str, Any]) -> list[str]:
    rows = stats["rows"]
    hurting = [r for r in rows if r["damage"] is not None and r["damage"] > 0.02]
    f1_ok = [r for r in hurting if r["f1"] >= 0.97]
    lat = [r["latency"] for r in rows if r["latency"] is not None]
    hb = sum(r["honest_bans"] for r in rows)
    kept = [r for r in hurting if r["kept"] is not None and r["kept"] <= 0.01]
    kept_h = [r for r in hurting if r["kept_honest"] is not None and r["kept_honest"] <= 0.01]
    short = ", ".join(f"{r['attack']}/{r['direction']}" for r in hurting if r["f1"] < 0.97) or "none"
    return [
        f"- F1 >= 0.97 on attacks that hurt the undefended loss by > 2 %: **{len(f1_ok)} of {len(hurting)}** "
        f"(short: {short})",
        f"- zero honest bans: **{hb}** honest bans over {len(rows)} defended attack runs",
        f"- mean detection latency <= 5 steps: mean over detected rows **{_f(sum(lat) / len(lat) if lat else None, 1)}**"
        f" steps ({sum(1 for x in lat if x <= 5)} of {len(lat)} rows <= 5)",
        f"- defended val loss at most 1 % above clean, on the damaging attacks: **{len(kept)} of {len(hurting)}** "
        f"(at most 1 % above the honest-only clean run: {len(kept_h)} of {len(hurting)})",
        f"- undefended visibly worse (> 2 %): **{len(hurting)} of {len(rows)}** attack rows",
    ]


def render(t: TableConfig, rows: list[Row], seconds: float, command: str) -> str:
    matrix = _by(rows, "matrix")
    pairs = [(a, d) for a in t.attacks for d in ("forward", "backward")]
    first = next((r.report for r in rows if r.report is not None), None)
    model = first["model"] if first else {}
    lines = [
        "# Detection table",
        "",
        f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `{command}` "
        f"({seconds / 60:.0f} min wall time in this invocation; cached runs are reused).",
        f"Machine: {platform.platform()}, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, torch {first['machine']['torch'] if first else '?'}, "
        f"1 thread. Code: {_code_versions(rows)}.",
        "",
        f"Swarm: {t.stages} stages x {t.replicas} replicas = {t.stages * t.replicas} workers, "
        f"{math.floor(t.malicious_fraction * t.replicas + 1e-9)} malicious per stage "
        f"({t.malicious_fraction:.1%}, first and last stages included), one verifier (committee of one). "
        f"Model: d_model {model.get('d_model')}, {model.get('n_layers')} layers (one per stage), seq_len "
        f"{model.get('seq_len')}, {first['parameters'] if first else '?'} parameters. Training: {t.steps} steps x "
        f"{t.micro_batches_per_step} micro-batches of 8 sequences, lr {t.lr}, attackers active from step "
        f"{t.attack_start}. "
        f"Data: `{Path(t.data).name}`. Screening: {screening_line(t.screening)}.",
        "",
        "Validation loss is that of the consensus model (per stage, the average of the non-banned "
        "replicas), on a fixed validation set. Detection is scored on bans: precision/recall/F1 over the "
        "workers able to attack in that direction (a backward-only attacker on stage 0 has nothing to "
        "send); latency counts steps from the attack start to the ban. \"Honest flag rate\" is the share "
        "of honest messages flagged; \"attacked msgs flagged\" the share of attacked messages flagged.",
        "",
    ]
    missing = [r for r in rows if r.report is None]
    if missing:
        lines += [f"**Partial table: {len(missing)} of {len(rows)} planned runs have not run yet** "
                  f"(first missing: {', '.join(f'{r.part} {r.label}' for r in missing[:6])}"
                  f"{', ...' if len(missing) > 6 else ''}); the goals below count only the rows present.", ""]
    if matrix:
        table, stats = _attack_table(matrix, pairs)
        lines += ["## Goals", "", *_goals(stats), "", "## Clean runs", "", *_clean_lines(matrix)]
        noise = [r.report for r in rows if r.part == "noise" and r.report is not None]
        clean = matrix.get("clean/none", {}).get("val_loss_final")
        if noise and clean:
            vals = [clean, *(n["val_loss_final"] for n in noise if n["val_loss_final"] is not None)]
            spread = (max(vals) - min(vals)) / clean
            lines.append(f"- seed-to-seed spread of the clean undefended val loss over {len(vals)} seeds: "
                         f"{', '.join(_f(v) for v in vals)} (range {spread:.1%} of clean)")
        lines += ["", f"## Matrix: {t.stages} x {t.replicas}", "", *table, "",
                  "![loss curves](loss_curves.png)", "", "![detection latency](detection_latency.png)", ""]
    lu = _by(rows, "lu")
    if lu:
        table, stats = _attack_table(lu, list(LU))
        lines += [f"## Lu et al.'s attacks at {t.stages} x {t.replicas}: a share of the messages attacked", "",
                  "Forward sign flip and backward replacement by Gaussian noise of the tensor's own scale "
                  f"(`random`), each on {' and '.join(f'{r:.0%}' for r in LU_RATES)} of a malicious worker's "
                  "messages (`intermittent,p=RATE`); the clean runs are the matrix's.", "",
                  *table, "", *_goals(stats), ""]
    wide = _by(rows, "wide")
    if wide:
        table, stats = _attack_table(wide, list(HEADLINE))
        lines += [f"## Headline rows at {t.stages} x {t.wide_replicas} ({t.stages * t.wide_replicas} workers, "
                  f"{math.floor(t.wide_fraction * t.wide_replicas + 1e-9)} malicious per stage = "
                  f"{t.wide_fraction:.1%})", "", *_clean_lines(wide), "", *table, "", *_goals(stats), ""]
    cost = _by(rows, "cost")
    if cost:
        lines += ["## Cost: sentinel vs duplicated computation (Lu et al.)", "",
                  "| run | defense | tokens/s | stage passes / token | MFLOP / token | F1 | honest bans |",
                  "|---|---|---|---|---|---|---|"]
        for label, r in cost.items():
            attack, _, defense = label.split("/")
            lines.append(f"| {attack} | {defense} | {r['tokens_per_s']:.0f} | {r['stage_passes_per_token']:.1f} "
                         f"| {r['flops_per_token'] / 1e6:.2f} | {_f(r['f1'], 2)} | {len(r['honest_banned'])} |")
        for attack in ("none", "sign_flip"):
            s, d = cost.get(f"{attack}/forward/sentinel"), cost.get(f"{attack}/forward/duplicate")
            if s and d:
                lines.append("")
                lines.append(f"- `{attack}`: sentinel / duplicate = **{s['tokens_per_s'] / d['tokens_per_s']:.2f}x** "
                             f"tokens/s, **{d['flops_per_token'] / s['flops_per_token']:.2f}x** less compute per "
                             f"token (target >= 1.9x)")
        lines.append("")
    mimic = [(d, matrix.get(f"ema_mimic/{d}/none"), matrix.get(f"ema_mimic/{d}/sentinel"))
             for d in ("forward", "backward")]
    if matrix and any(u and s for _, u, s in mimic):
        clean = matrix.get("clean/none", {}).get("val_loss_final")
        lines += ["## Adaptive attack: EMA-mimic", ""]
        for d, u, s in mimic:
            if u and s:
                lines.append(f"- {d}: undefended {_f(u['val_loss_final'])} ({_pct(u['val_loss_final'], clean)} vs "
                             f"clean), defended {_f(s['val_loss_final'])} ({_pct(s['val_loss_final'], clean)}); "
                             f"F1 {_f(s['f1'], 2)}, attacked messages flagged {_rate(s['flag_rate_attacked'])}")
        lines.append("")
    avg = _by(rows, "averaging")
    if avg:
        lines += ["## Averaging axis: honest on the pipeline, poisoned in the stage's average", "",
                  f"Every malicious worker ({math.floor(t.malicious_fraction * t.replicas + 1e-9)} of {t.replicas} "
                  "per stage) sends honest activations and gradients and lies only in its averaging "
                  "contributions (`sentinel/attacks/averaging.py`); SENTINEL screening on, contributions "
                  "screened with the defaults (`averaging_outlier_ratio` 3, `averaging_outlier_floor` 0.02). "
                  "Final validation loss (vs the clean run with the same rule), the attackers banned "
                  "(recall) and honest workers banned:", "",
                  "| attack | " + " | ".join(AVERAGING_RULES) + " |", "|---|" + "---|" * len(AVERAGING_RULES)]
        for attack in ("clean", *AVERAGING_ATTACKS):
            cells = []
            for rule in AVERAGING_RULES:
                r, c = avg.get(f"{attack}/{rule}"), avg.get(f"clean/{rule}")
                v = r["val_loss_final"] if r else None
                ref = c["val_loss_final"] if c else None
                bans = f"{len(r['honest_banned'])} honest bans" if r else ""
                cells.append("-" if r is None else f"{_f(v)}; {bans}" if attack == "clean"
                             else f"{_f(v)} ({_pct(v, ref)}); recall {_f(r['recall'], 2)}, {bans}")
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
        lines.append("")
    wiki = _by(rows, "wikitext")
    if wiki:
        table, stats = _attack_table(wiki, list(HEADLINE))
        lines += [f"## Headline rows on `{Path(t.wikitext).name}` (same defaults, no re-tuning)", "",
                  *_clean_lines(wiki), "", *table, "", *_goals(stats), ""]
    return "\n".join(lines) + "\n"


def plot(t: TableConfig, rows: list[Row]) -> list[Path]:
    """Loss curves (clean / undefended / defended, one panel per attack and direction) and latency bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = _by(rows, "matrix")
    if not matrix:
        return []
    t.out.mkdir(parents=True, exist_ok=True)
    written = []
    pairs = [(a, d) for a in t.attacks for d in ("forward", "backward")]
    cols = 6
    nrows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.4 * nrows), sharex=True, squeeze=False)
    clean = matrix.get("clean/none")
    for ax, (attack, direction) in zip(axes.flat, pairs, strict=False):
        for label, style, name in ((f"{attack}/{direction}/none", "tab:red", "undefended"),
                                   (f"{attack}/{direction}/sentinel", "tab:blue", "sentinel")):
            r = matrix.get(label)
            if r:
                xs = [s for s, v in r["val_loss"] if v is not None]
                ax.plot(xs, [v for _, v in r["val_loss"] if v is not None], color=style, label=name)
        if clean:
            ax.plot([s for s, _ in clean["val_loss"]], [v for _, v in clean["val_loss"]], color="black",
                    linestyle="--", label="clean")
        ax.axvline(t.attack_start, color="grey", linewidth=0.6)
        ax.set_title(f"{attack} / {direction}", fontsize=8)
        ax.tick_params(labelsize=7)
        ref = clean["val_loss_final"] if clean else None
        if ref:
            ax.set_ylim(ref * 0.9, max(ref * 1.6, 3.0))
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("step")
    fig.supylabel("validation loss")
    fig.tight_layout()
    path = t.out / "loss_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(11, 3.6))
    labels, means, maxes = [], [], []
    for attack, direction in pairs:
        r = matrix.get(f"{attack}/{direction}/sentinel")
        if r is None:
            continue
        labels.append(f"{attack.split(',')[0]}/{direction[0]}")
        means.append(r["detection_latency_steps"] if r["detection_latency_steps"] is not None else 0.0)
        maxes.append(r["detection_latency_max_steps"] or 0)
    xs = range(len(labels))
    ax.bar(xs, maxes, color="tab:gray", alpha=0.4, label="max")
    ax.bar(xs, means, color="tab:blue", label="mean")
    ax.axhline(5, color="tab:red", linestyle="--", linewidth=0.8, label="goal (5 steps)")
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("steps from attack start to ban")
    ax.set_title(f"Detection latency, {t.stages} x {t.replicas}, sentinel (no bar: nobody banned)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = t.out / "detection_latency.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


#: The screening knobs a results header names: the ones whose defaults were chosen on clean
#: simulator runs (BENCHMARKS.md, "One safe screening default").
HEADLINE_SCREENING = ("fence_k", "fence_iqr_floor", "strike_limit", "forgive_after", "drift_fraction")


def screening_line(overrides: dict[str, Any]) -> str:
    """How a results header names its screening: the library defaults, or what it overrode."""
    if not overrides:
        cfg = ScreeningConfig()
        return "the library defaults (" + ", ".join(f"{k}={getattr(cfg, k)}" for k in HEADLINE_SCREENING) + ")"
    return "library defaults overridden with " + ", ".join(f"{k}={v}" for k, v in overrides.items())


def build_parser() -> argparse.ArgumentParser:
    d = TableConfig()
    p = argparse.ArgumentParser(prog="sentinel-sim --table", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(d.parts), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--attacks", default=";".join(d.attacks),
                   help="attack specs separated by ';' (a spec may hold commas: scaling,factor=10)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--micro-batches-per-step", type=int, default=d.micro_batches_per_step)
    p.add_argument("--attack-start", type=int, default=d.attack_start)
    p.add_argument("--stages", type=int, default=d.stages)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--malicious-fraction", type=float, default=d.malicious_fraction)
    p.add_argument("--model-size", default=d.model_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr}: this model's own)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", default=d.data)
    p.add_argument("--wikitext", default=d.wikitext)
    p.add_argument("--screen", action="append", default=[], metavar="KEY=VALUE",
                   help="ScreeningConfig override on top of the library defaults, repeatable")
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--cache", type=Path, default=d.cache)
    p.add_argument("--json", type=Path, help="also write every report (with curves) here")
    p.add_argument("--render-only", action="store_true",
                   help="run nothing: render the cached runs (rows not yet run are left out, and counted)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="simulations run in parallel, one thread each (default: one per core)")
    return p


def main(argv: list[str] | None = None, prog: str = "sentinel-sim --table") -> None:
    """Run the table; ``prog`` is how the command is recorded in the results."""
    from sentinel.sim.cli import parse_overrides

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    parser.prog = prog
    a = parser.parse_args(argv)
    parts = parse_parts(a.parts, PARTS)
    attacks = tuple(x.strip() for x in a.attacks.split(";") if x.strip())
    t = TableConfig(stages=a.stages, replicas=a.replicas, malicious_fraction=a.malicious_fraction, steps=a.steps,
                    micro_batches_per_step=a.micro_batches_per_step, attack_start=a.attack_start,
                    model_size=a.model_size, lr=a.lr, seed=a.seed, data=a.data, wikitext=a.wikitext,
                    screening=parse_overrides(a.screen),
                    attacks=attacks, parts=parts, out=a.out, cache=a.cache)
    for path in (t.data, t.wikitext if "wikitext" in parts else t.data):
        if not Path(path).is_file():
            raise SystemExit(f"corpus not found: {path} (the table reads ../shared/data beside the repo; "
                             "pass --data / --wikitext)")
    rows = plan(t)
    print(f"{len(rows)} runs planned", file=sys.stderr, flush=True)
    if a.render_only:
        load_cached(rows, t.cache)
        seconds = 0.0
    else:
        seconds = execute(rows, t.cache, jobs=max(1, a.jobs))
    command = " ".join([prog, *(x for x in argv if x != "--render-only")])
    t.out.mkdir(parents=True, exist_ok=True)
    (t.out / "detection_table.md").write_text(render(t, rows, seconds, command))
    written = plot(t, rows)
    if a.json is not None:
        a.json.write_text(json.dumps([{"part": r.part, "label": r.label, **(r.report or {})} for r in rows]))
    print(f"wrote {t.out / 'detection_table.md'} and {', '.join(str(p) for p in written)}", file=sys.stderr)


__all__ = ["ATTACKS", "HEADLINE", "PARTS", "Row", "TableConfig", "execute", "load_cached", "main", "parse_parts",
           "plan", "plot", "render"]

