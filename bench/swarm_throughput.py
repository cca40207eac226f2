"""Tokens/s of the local multi-process swarm against single-process training of the same model.

    python bench/swarm_throughput.py [--stages 3 --replicas 2 --verifiers 2 --steps 60] [--json out.json]

Both runs happen in this one invocation on the same machine, so the ratio is meaningful even on
a noisy host. The baseline is the full model (all stages composed) trained in one process with
the same micro-batch size, the same optimizer and one thread, on the same corpus.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from sentinel.cli.swarm import LocalSwarm, SwarmConfig
from sentinel.model.corpus import load_corpus
from sentinel.model.stages import build_full_model
from sentinel.run.manifest import RunManifest

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def single_process_tokens_per_s(manifest: RunManifest, data: str | None, micro_batches: int) -> float:
    """Train the composed model in one process, one thread: the no-network baseline."""
    torch.set_num_threads(1)
    corpus = load_corpus(data)
    model = build_full_model(manifest.model, seed=manifest.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=manifest.optimizer.lr,
                            betas=(manifest.optimizer.beta1, manifest.optimizer.beta2))
    b, t = manifest.training.micro_batch_size, manifest.model.seq_len
    batches = [corpus.batch("train", b, t, seed=0, index=i) for i in range(micro_batches)]
    t0 = time.perf_counter()
    for x, y in batches:
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), manifest.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return micro_batches * b * t / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--verifiers", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro-batches-per-step", type=int, default=2)
    p.add_argument("--no-screening", action="store_true")
    p.add_argument("--data", default=str(SHAKESPEARE) if SHAKESPEARE.is_file() else None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    cfg = SwarmConfig(stages=args.stages, replicas=args.replicas, verifiers=args.verifiers, steps=args.steps,
                      data=args.data, malicious=0, eval_every=10**9, eval_batches=1,
                      micro_batches_per_step=args.micro_batches_per_step, screening=not args.no_screening)
    with tempfile.TemporaryDirectory(prefix="sentinel-bench-") as tmp:
        swarm = LocalSwarm(cfg, tmp)
        try:
            swarm.start()
            swarm.wait()
        finally:
            swarm.stop()
        report = swarm.report()
    manifest = RunManifest.from_dict({**swarm.manifest_dict(), "model": {}})
    base = single_process_tokens_per_s(manifest, args.data, micro_batches=60)
    result = {
        "command": "python bench/swarm_throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False) and k != "json"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {__import__('os').cpu_count()} cores",
        "swarm_tokens_per_s": round(report["tokens_per_s"], 1),
        "single_process_tokens_per_s": round(base, 1),
        "ratio": round(report["tokens_per_s"] / base, 3),
        "screening": not args.no_screening,
        "swarm": f"{args.stages} stages x {args.replicas} replicas, {args.verifiers} verifiers",
        "micro_batches_lost": report["micro_batches"]["lost"],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
