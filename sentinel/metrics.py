"""Process-wide counters and gauges with Prometheus-style names.

Why our own and not ``prometheus_client``: the protocol layer must count every rejection from its
first import (the CLI, tests and the simulator import it too), with no registry to wire up and no
global side effects; the bootstrap monitor renders :meth:`Metrics.render_prometheus` on ``/metrics``
and :meth:`Metrics.snapshot` on ``/api/state``.

Counter names in use (others may add more; counters end in ``_total``):

- ``sentinel_rejected_messages_total{reason=...}``: messages refused by the protocol checks; the
  reason is :attr:`sentinel.protocol.errors.ProtocolError.reason` (``malformed``, ``oversized``,
  ``forged_signature``, ``wrong_sender``, ``wrong_run``, ``replayed``, ``stale_step``,
  ``wrong_shape``, ``wrong_dtype``, ``non_finite``).
- ``sentinel_rejected_records_total{reason=...}``: DHT records refused by the record validator
  (``unsigned``, ``forged_signature``, ``wrong_sender``, ``malformed``, ``oversized``,
  ``wrong_key``, ``wrong_run``, ``unknown_record``, ``invalid_record``).
- ``sentinel_messages_total{kind=...,direction=...}``: messages sent/received, by kind.
- ``sentinel_bytes_total{direction=in|out}``: wire bytes.
"""

from __future__ import annotations

import math
import re
import threading

__all__ = ["Metrics", "METRICS"]

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    """Escape a label value as the Prometheus text exposition format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_key(labels: dict[str, object]) -> LabelKey:
    for label in labels:
        if not _LABEL_RE.match(label) or label.startswith("__"):
            raise ValueError(f"invalid metric label name {label!r}")
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label_string(key: LabelKey) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in key)


class Metrics:
    """A tiny thread-safe registry: each metric name is a counter or a gauge, fixed at first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._types: dict[str, str] = {}
        self._values: dict[str, dict[LabelKey, float]] = {}

    def _series(self, name: str, kind: str) -> dict[LabelKey, float]:
        known = self._types.get(name)
        if known is None:
            if not _NAME_RE.match(name):
                raise ValueError(f"invalid metric name {name!r}")
            self._types[name] = kind
            return self._values.setdefault(name, {})
        if known != kind:
            raise ValueError(f"metric {name!r} is a {known}, not a {kind}")
        return self._values[name]

    def inc(self, name: str, value: float = 1.0, **labels: object) -> None:
        """Add ``value`` (>= 0) to a counter."""
        if value < 0:
            raise ValueError(f"counter {name!r} can only increase (got {value})")
        key = _label_key(labels)
        with self._lock:
            series = self._series(name, "counter")
            series[key] = series.get(key, 0.0) + float(value)

    def set(self, name: str, value: float, **labels: object) -> None:
        """Set a gauge to ``value``."""
        key = _label_key(labels)
        with self._lock:
            self._series(name, "gauge")[key] = float(value)

    def get(self, name: str, **labels: object) -> float:
        """Current value of one series; 0.0 if it was never touched."""
        key = _label_key(labels)
        with self._lock:
            return self._values.get(name, {}).get(key, 0.0)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """JSON-friendly copy: metric name -> {'k="v",...' label string -> value}."""
        with self._lock:
            return {
                name: {_label_string(key): value for key, value in series.items()}
                for name, series in self._values.items()
            }

    def render_prometheus(self) -> str:
        """The whole registry in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        with self._lock:
            for name in sorted(self._values):
                lines.append(f"# TYPE {name} {self._types[name]}")
                for key, value in sorted(self._values[name].items()):
                    labels = _label_string(key)
                    series = f"{name}{{{labels}}}" if labels else name
                    lines.append(f"{series} {_format_value(value)}")
        return "\n".join(lines) + "\n" if lines else ""

    def reset(self) -> None:
        """Forget everything (tests, and a node that restarts its run in-process)."""
        with self._lock:
            self._types.clear()
            self._values.clear()


METRICS = Metrics()
