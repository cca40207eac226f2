"""The run manifest: everything every node of one training run must agree on.

The bootstrap peer publishes it as a DHT record signed with the maintainer's identity; nodes
accept only the manifest signed by the peer they bootstrapped from (the ``/p2p/<id>`` part of
``--initial-peers``) or by a key they were told to trust. Because every field that shapes a
tensor lives here (model config, micro-batch size), workers and verifiers can check incoming
tensors' dtype and shape against it.

Loading from YAML/JSON is strict: unknown keys are errors, so a typo in a maintainer's config
file fails loudly instead of silently using a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sentinel.model.config import ModelConfig
from sentinel.run.screening import ScreeningConfig


class ManifestError(ValueError):
    """A run manifest or config file that cannot be used, with what to fix."""


@dataclass
class OptimizerConfig:
    """AdamW settings each worker applies to its own stage."""

    # Each replica takes one AdamW step per micro-batch of 8 sequences. At 3e-3 runs leave the
    # unigram plateau at run-dependent steps, so two clean runs differ widely; at 1e-3 they end
    # closer and lower (BENCHMARKS.md, "Learning rate and run-to-run spread").
    lr: float = 1e-3
    # Linear warm-up: a replica's first N optimizer steps scale the learning rate by (step + 1) / N.
    # Counted per replica: one that joins late warms its fresh optimizer state up again, one resumed
    # from a checkpoint goes on where it was. 0 = off; the local launcher uses 40 (SwarmConfig).
    warmup_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # per-stage global-norm clip; stages cannot see each other's grads


SYNC_MODES = ("async", "lockstep")


@dataclass
class TrainingConfig:
    """How micro-batches become optimizer steps and how replicas stay in sync."""

    micro_batch_size: int = 8
    # per verifier, processed concurrently to fill the pipeline. Also the screen's sample rate:
    # fences fitted on 2 messages per boundary per step over-flag honest replicas early in
    # training, up to honest bans; 4 do not (docs/design.md).
    micro_batches_per_step: int = 4
    accumulate: int = 1  # backward passes a worker accumulates before its optimizer step
    average_every: int = 2  # a worker averages parameters with its stage's replicas every N optimizer steps
    # (replicas that drift apart between rounds look different to the screen: keep rounds frequent)
    # Aggregation rule of a stage's round: its replicas' gradients in lockstep, their parameters
    # in async. CenteredClip bounds what a minority of poisoned contributions does before they
    # are proven wrong (a lockstep stage applies the aggregate on every replica at once) and
    # costs a clean run almost nothing (BENCHMARKS.md, "Lockstep as the default").
    averaging: str = "centered-clip"
    # Bounded staleness: once this many optimizer steps have passed since the averaging round in
    # flight began (a slow replica, a loaded machine), the worker holds further steps, keeps
    # accumulating gradients, and applies them when the round ends. Unchecked, a stalled round
    # lets a replica drift from its stage until the verifiers flag it. 0 turns holding off.
    max_local_steps: int = 6
    # How a round moves parameters (``sentinel.worker.node``). "butterfly": the flat parameters
    # are cut into parts (``sentinel.protocol.aggregation.partition``), each replica robustly reduces
    # the parts it owns from everyone's pushed slices and serves the result, so a replica moves
    # about 2(n-1)/n copies of its stage per round and no message exceeds one part. "gather":
    # every replica fetches every other's whole parameters and reduces alone (n-1 copies, the
    # stage in one message). "auto" (default): gather while a stage fits in half a message,
    # butterfly beyond. Why not always butterfly: replicas average on their own clocks, and
    # butterfly rounds (which wait for, or reuse, the others' pushes) leave them further apart
    # than gather rounds, enough for the screen to ban an honest stage-0 worker (BENCHMARKS.md,
    # "Butterfly vs gather").
    averaging_partition: str = "auto"
    averaging_part_numel: int = 2**20  # largest part, in elements (4 MiB of float32 per message)
    # A replica's slice pushed to (or pulled by) a reducer this recently is reused for another
    # requester's round instead of being pulled again: replicas average at about the same pace,
    # so one push per round serves every reduction of that part.
    averaging_reuse_s: float = 5.0
    # Share of reduced parts a requester audits: it fetches the signed slices the reducer
    # committed to and recomputes the reduction. A reducer's first answer is always audited; one
    # caught lying is reported to the verifiers and its parts are reduced locally from then on.
    averaging_audit: float = 0.25
    # How a stage's replicas stay together (``sentinel.worker.lockstep``). "lockstep" (default):
    # replicas accumulate the passes of a pipeline step, aggregate their *gradients* at the step
    # boundary and apply one identical update, so honest replicas hold bit-identical parameters
    # at every numbered version and any hop or gradient contribution can be re-checked exactly
    # on another replica (the screening's ``spot_check``). "async", the measured baseline: each
    # replica steps its own optimizer after every ``accumulate`` passes and averages parameters
    # every ``average_every`` steps, so replicas agree only approximately and no check is exact.
    sync: str = "lockstep"
    eval_batches: int = 4  # validation micro-batches per evaluation
    eval_every: int = 50  # verifier steps between validation evaluations
    hop_timeout_min_s: float = 20.0  # floor of the adaptive per-hop timeout
    hop_timeout_factor: float = 8.0  # timeout = max(floor, factor * latency EMA of that stage)
    # A hop still unanswered after max(hop_hedge_min_s, hop_hedge_factor * the stage's median
    # latency) is sent to a second replica too, and the first valid answer wins: a slow or
    # silent worker costs the step that much, not the whole timeout. 0 turns hedging off.
    hop_hedge_min_s: float = 2.0
    hop_hedge_factor: float = 4.0
    max_hop_retries: int = 50  # attempts per hop before a micro-batch is declared failed


@dataclass
class RunManifest:
    """The signed description of one run. Defaults are sized for a 2-core CPU demo."""

    run_id: str = "sentinel-demo"
    num_stages: int = 3
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    corpus: str = "default"  # "default" (generated) or a path every verifier can read
    corpus_fingerprint: str = ""  # pins the corpus content; empty = not checked
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)  # the verifiers' screening policy
    committee_size: int = 3
    trusted_verifiers: list[str] = field(default_factory=list)  # pinned committee (trusted mode) if non-empty
    # Open mode only: a verifier candidacy must carry a proof-of-work stamp of this many leading
    # zero bits (``sentinel.protocol.stamps``), so a flood of Sybil announcements costs 2**bits
    # hashes per announcement. 20 bits cost a fraction of a second of one core per verifier and
    # run; owning a 3-seat committee against N honest candidates takes ~3(N+1) stamps
    # (BENCHMARKS.md, "Committee capture"). Public swarms should raise it (each +1 doubles both
    # costs) or pin the committee. 0 turns stamps off.
    verifier_stamp_bits: int = 20
    max_message_bytes: int = 64 * 2**20
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ManifestError with an actionable message for an impossible configuration."""
        if not self.run_id or len(self.run_id) > 64 or "/" in self.run_id:
            raise ManifestError(f"run_id must be 1-64 characters without '/': got {self.run_id!r}")
        if self.num_stages < 1:
            raise ManifestError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.num_stages > self.model.n_layers:
            raise ManifestError(
                f"num_stages={self.num_stages} exceeds model.n_layers={self.model.n_layers}: "
                "each stage needs at least one layer"
            )
        t = self.training
        for name in ("micro_batch_size", "micro_batches_per_step", "accumulate", "average_every"):
            if getattr(t, name) < 1:
                raise ManifestError(f"training.{name} must be >= 1, got {getattr(t, name)}")
        if t.max_local_steps < 0:
            raise ManifestError(f"training.max_local_steps must be >= 0 (0 = never hold), got {t.max_local_steps}")
        for name in ("hop_hedge_min_s", "hop_hedge_factor"):
            v = getattr(t, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ManifestError(f"training.{name} must be a finite number >= 0, got {v!r}")
        if t.averaging_partition not in ("auto", "butterfly", "gather"):
            raise ManifestError("training.averaging_partition must be auto|butterfly|gather, "
                                f"got {t.averaging_partition!r}")
        if isinstance(t.averaging_part_numel, bool) or not isinstance(t.averaging_part_numel, int) \
                or t.averaging_part_numel < 1:
            raise ManifestError(f"training.averaging_part_numel must be an integer >= 1, got {t.averaging_part_numel!r}")
        for name, hi in (("averaging_reuse_s", math.inf), ("averaging_audit", 1.0)):
            v = getattr(t, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not 0 <= v <= hi:
                raise ManifestError(f"training.{name} must be a number in [0, {hi:g}], got {v!r}")
        if t.sync not in SYNC_MODES:
            raise ManifestError(f"training.sync must be {'|'.join(SYNC_MODES)}, got {t.sync!r}")
        if t.averaging not in ("mean", "centered-clip", "trimmed-mean"):
            raise ManifestError(f"training.averaging must be mean|centered-clip|trimmed-mean, got {t.averaging!r}")
        if self.committee_size < 1:
            raise ManifestError(f"committee_size must be >= 1, got {self.committee_size}")
        bits = self.verifier_stamp_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 40:
            raise ManifestError(f"verifier_stamp_bits must be an integer in 0..40 (0 = no stamps), got {bits!r}")
        if self.optimizer.lr <= 0:
            raise ManifestError(f"optimizer.lr must be > 0, got {self.optimizer.lr}")
        w = self.optimizer.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ManifestError(f"optimizer.warmup_steps must be an integer >= 0, got {w!r}")

    # -- serialisation -------------------------------------------------------------------------
    def butterfly_averaging(self, numel: int) -> bool:
        """Whether a stage of ``numel`` float32 parameters averages in butterfly rounds
        (``training.averaging_partition``; "auto": when it does not fit in half a message)."""
        mode = self.training.averaging_partition
        return mode == "butterfly" or (mode == "auto" and 4 * numel > self.max_message_bytes // 2)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunManifest:
        _check_keys(cls, d, "the manifest")
        kw = dict(d)
        try:
            if "model" in kw:
                kw["model"] = ModelConfig.from_dict(kw["model"])
            for key, sub in (("optimizer", OptimizerConfig), ("training", TrainingConfig),
                             ("screening", ScreeningConfig)):
                if key in kw:
                    kw[key] = _sub_from_dict(sub, kw[key], key)
            return cls(**kw)
        except ManifestError:
            raise
        except (TypeError, ValueError) as e:
            raise ManifestError(f"invalid manifest: {e}") from e

    def fingerprint(self) -> str:
        """Short content hash: two nodes with the same fingerprint train the same run."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()


def _check_keys(cls: type, d: Any, where: str) -> None:
    """``d`` is a mapping with only ``cls``'s field names, or a ManifestError names the rest."""
    if not isinstance(d, dict):
        raise ManifestError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ManifestError(f"unknown keys in {where}: {unknown}; known: {sorted(known)}")


def _sub_from_dict(cls: type, d: Any, where: str) -> Any:
    _check_keys(cls, d, where)
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"invalid {where}: {e}") from e


def load_manifest_file(path: str | Path) -> RunManifest:
    """Read a YAML (or JSON) config file into a manifest, with a clear error for each failure."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ManifestError(f"cannot parse config file {p}: {e}") from e
    return RunManifest.from_dict(data or {})


def new_run_id(prefix: str = "run") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"
