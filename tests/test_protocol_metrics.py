"""Metrics registry: counters, gauges, JSON snapshot and Prometheus text exposition."""

from __future__ import annotations

import threading

import pytest

from sentinel.metrics import METRICS, Metrics
from sentinel.protocol.checks import MessageChecker
from sentinel.protocol.codec import Message
from sentinel.protocol.errors import MalformedMessageError


def test_counters_gauges_and_snapshot() -> None:
    m = Metrics()
    m.inc("sentinel_rejected_messages_total", reason="malformed")
    m.inc("sentinel_rejected_messages_total", 2, reason="malformed")
    m.inc("sentinel_bytes_total", 100, direction="in")
    m.set("sentinel_peers", 3)
    assert m.get("sentinel_rejected_messages_total", reason="malformed") == 3.0
    assert m.get("sentinel_rejected_messages_total", reason="other") == 0.0
    assert m.snapshot() == {
        "sentinel_rejected_messages_total": {'reason="malformed"': 3.0},
        "sentinel_bytes_total": {'direction="in"': 100.0},
        "sentinel_peers": {"": 3.0},
    }
    m.reset()
    assert m.snapshot() == {}


def test_misuse_is_refused() -> None:
    m = Metrics()
    m.inc("c_total")
    with pytest.raises(ValueError):
        m.set("c_total", 1)
    with pytest.raises(ValueError):
        m.inc("c_total", -1)
    with pytest.raises(ValueError):
        m.inc("bad name")
    with pytest.raises(ValueError):
        m.inc("x_total", **{"bad-label": 1})


def test_prometheus_rendering_escapes_labels() -> None:
    m = Metrics()
    m.inc("sentinel_messages_total", kind="forward", direction="in")
    m.inc("sentinel_rejected_records_total", reason='we"ird\\\nvalue')
    m.set("sentinel_loss", float("inf"))
    text = m.render_prometheus()
    assert "# TYPE sentinel_messages_total counter\n" in text
    assert 'sentinel_messages_total{direction="in",kind="forward"} 1.0\n' in text
    assert 'sentinel_rejected_records_total{reason="we\\"ird\\\\\\nvalue"} 1.0\n' in text
    assert "# TYPE sentinel_loss gauge\nsentinel_loss +Inf\n" in text
    assert Metrics().render_prometheus() == ""


def test_thread_safe_increments() -> None:
    m = Metrics()

    def work() -> None:
        for _ in range(2000):
            m.inc("n_total", kind="x")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.get("n_total", kind="x") == 8000


def test_the_process_wide_registry_counts_what_the_protocol_rejects() -> None:
    """What a node serves on /metrics is this registry: a rejected message is counted there by
    its reason, once."""
    checker = MessageChecker("metrics-run")
    forged = Message(header={"run": "metrics-run"}, tensors={})
    before = METRICS.get("sentinel_rejected_messages_total", reason="malformed")
    with pytest.raises(MalformedMessageError):
        checker.check(forged)
    assert METRICS.get("sentinel_rejected_messages_total", reason="malformed") == before + 1
    assert 'sentinel_rejected_messages_total{reason="malformed"}' in METRICS.render_prometheus()
