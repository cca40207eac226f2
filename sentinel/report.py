"""The swarm report: one JSON merging every node's report with the ground truth of the launcher.

Detection is scored against who was actually malicious: precision/recall/F1 of bans, honest
workers banned, and detection latency (steps from a worker's first attack to its ban).
"""

from __future__ import annotations

import json
from collections import defaultdict
from statistics import mean
from typing import Any

# what a lockstep worker reports of its stage's rounds (``sentinel.worker.node``)
LOCKSTEP_KEYS = ("lockstep_version", "params_digest", "lockstep_rounds", "lockstep_empty_rounds", "resyncs",
                 "lockstep_left_out", "lockstep_seconds", "lockstep_checked", "lockstep_proven",
                 "lockstep_unverified")


def _load(path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rejections(metrics: dict[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for name in ("sentinel_rejected_messages_total", "sentinel_rejected_records_total"):
        for labels, value in (metrics or {}).get(name, {}).items():
            reason = labels.split("reason=", 1)[-1].strip('{}"') if "reason=" in labels else labels or "unknown"
            out[reason] += value
    return dict(out)


def detection_scores(malicious: set[str], banned: dict[str, int], attack_start: int) -> dict[str, Any]:
    tp = len(malicious & set(banned))
    fp = len(set(banned) - malicious)
    fn = len(malicious - set(banned))
    precision = tp / (tp + fp) if tp + fp else (1.0 if not malicious else 0.0)
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    lat = [max(0, banned[p] - attack_start) for p in malicious & set(banned)]
    return {"precision": precision, "recall": recall, "f1": f1,
            "detection_latency_steps": mean(lat) if lat else None,
            "honest_banned": sorted(set(banned) - malicious)}


def swarm_report(swarm: Any) -> dict[str, Any]:
    cfg = swarm.cfg
    vreports = [r for r in (_load(v.report_path) for v in swarm.verifiers) if r]
    by_worker = [(w, _load(w.report_path)) for w in swarm.workers]
    wreports = [r for _, r in by_worker if r]
    malicious = {n.peer_id for n in swarm.workers if n.attack}
    banned: dict[str, dict[str, Any]] = {}
    for r in vreports:
        for b in r.get("banned", []):
            cur = banned.get(b["peer"])
            if cur is None or b["step"] < cur["step"]:
                banned[b["peer"]] = b
    names = {n.peer_id: n.name for n in [swarm.bootstrap, *swarm.nodes]}
    rejected: dict[str, float] = defaultdict(float)
    for r in [*vreports, *wreports]:
        for k, v in _rejections(r.get("metrics")).items():
            rejected[k] += v
    flags: dict[str, int] = defaultdict(int)
    for r in vreports:
        for k, v in r.get("flags", {}).items():
            flags[k] += v
    mb = defaultdict(int)
    for r in vreports:
        for k in ("total", "completed", "failed", "retried_hops", "substituted", "tainted", "hedged_hops"):
            mb[k] += r.get("micro_batches", {}).get(k, 0)
    per_step_ok = all(
        all(d["completed"] + d["failed"] == d["micro_batches"] == cfg.micro_batches_per_step
            for d in r.get("micro_batches", {}).get("per_step", {}).values())
        and len(r.get("micro_batches", {}).get("per_step", {})) == r.get("steps")
        for r in vreports)

    def avg(key: str) -> float | None:
        vals = [r[key] for r in vreports if r.get(key) is not None]
        return mean(vals) if vals else None

    tokens = sum(r.get("tokens", 0) for r in vreports)
    train_s = max((r.get("train_seconds", 0.0) for r in vreports), default=0.0)
    scores = detection_scores(malicious, {p: b["step"] for p, b in banned.items()}, cfg.attack_start)
    flag_rates: dict[str, list[float]] = defaultdict(list)
    for r in vreports:
        for k, v in (r.get("flag_rates") or {}).items():
            flag_rates[k].append(v)
    return {
        "config": {k: v for k, v in vars(cfg).items()},
        "steps": cfg.steps,
        "tokens": tokens,
        "tokens_per_s": tokens / train_s if train_s else 0.0,
        "train_seconds": train_s,
        "train_loss_first": avg("train_loss_first"),
        "train_loss_last": avg("train_loss_last"),
        "val_loss_first": avg("val_loss_first"),
        "val_loss_last": avg("val_loss_last"),
        "val_loss_curves": {r["peer"]: r.get("val_loss") for r in vreports},
        "train_loss_curves": {r["peer"]: r.get("train_loss") for r in vreports},
        "peers": [{"id": n.peer_id, "name": n.name, "role": n.role, "stage": n.stage, "malicious": bool(n.attack)}
                  for n in [swarm.bootstrap, *swarm.nodes]],
        "rejected_messages": dict(rejected),
        "micro_batches": {**mb, "accounted": per_step_ok and mb["completed"] + mb["failed"] == mb["total"],
                          "lost": mb["total"] - mb["completed"]},
        "malicious": sorted(malicious),
        "banned": [{**b, "name": names.get(b["peer"], "?"),
                    "votes": [names.get(v, v) for v in b.get("votes", [])]} for b in banned.values()],
        "flags": dict(flags),
        "flag_rates": {k: mean(v) for k, v in flag_rates.items()},
        **scores,
        "honest_banned": [names.get(p, p) for p in scores["honest_banned"]],
        "workers": [{"name": w.name, "stage": w.stage, "malicious": bool(w.attack), "params": r.get("params", {}),
                     "averaging_divergence": r.get("averaging", {}).get("divergence_mean"),
                     "averaging_rounds": r.get("averaging", {}).get("rounds"),
                     "butterfly": r.get("averaging", {}).get("butterfly", {}),
                     **{k: r[k] for k in LOCKSTEP_KEYS if k in r}}
                    for w, r in by_worker if r],
        "replica_agreement": [r["replica_agreement"] for r in vreports if r.get("replica_agreement")],
        "verifier_reports": len(vreports),
        "worker_reports": len(wreports),
        "screen_seconds": sum(r.get("screen_seconds", 0.0) for r in vreports),
    }


def print_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = report["config"]
    t = Table(title=f"Sentinel swarm: {c['stages']} stages x {c['replicas']} replicas, {c['verifiers']} verifiers")
    t.add_column("metric")
    t.add_column("value", justify="right")

    def f(v: Any, nd: int = 3) -> str:
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    mb = report["micro_batches"]
    rows = [
        ("steps", f(report["steps"])),
        ("tokens", f(report["tokens"])),
        ("tokens/s", f(report["tokens_per_s"], 0)),
        ("train loss first -> last", f"{f(report['train_loss_first'])} -> {f(report['train_loss_last'])}"),
        ("val loss first -> last", f"{f(report['val_loss_first'])} -> {f(report['val_loss_last'])}"),
        ("micro-batches completed / total", f"{mb.get('completed')} / {mb.get('total')}"),
        ("hops retried", f(mb.get("retried_hops"))),
        ("malicious workers", f(len(report["malicious"]))),
        ("banned", ", ".join(f"{b['name']}@step{b['step']} (votes {', '.join(b['votes'])})"
                             for b in report["banned"]) or "none"),
        ("honest banned", ", ".join(report["honest_banned"]) or "none"),
        ("precision / recall / F1", f"{f(report['precision'], 2)} / {f(report['recall'], 2)} / {f(report['f1'], 2)}"),
        ("detection latency (steps)", f(report["detection_latency_steps"], 1)),
        ("rejected messages", ", ".join(f"{k}={int(v)}" for k, v in report["rejected_messages"].items()) or "0"),
    ]
    clean = report.get("clean_run")
    if clean:
        gap = report.get("val_loss_vs_clean")
        rows.append(("val loss last: this run / clean run",
                     f"{f(report['val_loss_last'])} / {f(clean.get('val_loss_last'))}"
                     + ("" if gap is None else f" ({gap:+.1%})")))
    for k, v in report["flag_rates"].items():
        rows.append((f"flag rate {k}", f"{v:.3%}"))
    for r in rows:
        t.add_row(*r)
    Console().print(t)
