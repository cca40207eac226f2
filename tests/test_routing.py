"""Replica choice (``sentinel.verifier.routing.Router``) on a fake clock."""

from __future__ import annotations

from sentinel.verifier.routing import Router, RouterConfig


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _serve(router: Router, workers: list[str], steps: int, latency: dict[str, float], clock: Clock,
           width: int = 3, dt: float = 0.1) -> dict[str, int]:
    """``steps`` rounds of ``width`` concurrent hops (as a verifier's micro-batches are); each
    picked worker answers in ``latency[w]``; returns hop counts per worker."""
    got = dict.fromkeys(workers, 0)
    for _ in range(steps):
        picked = []
        for _ in range(width):
            w = router.pick(workers)
            router.started(w)
            picked.append(w)
        for w in picked:
            router.finished(w, latency[w])
            got[w] += 1
        clock.t += dt
    return got


def test_the_fastest_replica_gets_the_traffic_and_a_failed_one_backs_off() -> None:
    clock = Clock()
    router = Router(RouterConfig(reprobe_after_s=0), clock=clock, salt="t")
    for w, lat in (("a", 0.05), ("b", 0.2)):
        router.started(w)
        router.finished(w, lat)
    assert router.pick(["a", "b"]) == "a"
    router.started("a")
    router.failed("a")
    assert not router.available("a") and router.pick(["a", "b"]) == "b"
    clock.t += 1.1  # backoff_base_s
    assert router.available("a")


def test_one_slow_sample_does_not_starve_an_honest_replica() -> None:
    """Without ageing, a replica whose only recent sample was slow gets nothing while its peers
    stay faster; with it, the estimate is forgotten after ``reprobe_after_s`` and it is tried
    again (and, answering normally, keeps its share)."""
    workers = ["a", "b", "c"]
    latency = {"a": 0.05, "b": 0.05, "c": 0.05}
    for reprobe, starved in ((0.0, True), (5.0, False)):
        clock = Clock()
        router = Router(RouterConfig(reprobe_after_s=reprobe), clock=clock, salt="t")
        _serve(router, workers, 30, latency, clock)
        router.started("c")
        router.finished("c", 1.0)  # one slow sample (a GC pause, a loaded host)
        got = _serve(router, workers, 200, latency, clock)  # 20 s of 3 concurrent hops
        assert (got["c"] == 0) is starved, (reprobe, got)
        if not starved:
            assert got["c"] >= 100, got  # back to about a third of the 600 hops once re-measured


def test_a_straggler_estimate_from_a_lost_hedge_does_not_age() -> None:
    """A silent worker's estimate is a lower bound: re-probing it would cost a hedge delay each
    time, so it keeps its estimate until it answers."""
    clock = Clock()
    router = Router(RouterConfig(reprobe_after_s=5.0), clock=clock, salt="t")
    workers = ["silent", "b"]
    _serve(router, ["b"], 5, {"b": 0.05}, clock, width=1)
    router.started("silent")
    router.abandoned("silent", 2.0)
    clock.t += 60.0
    assert all(router.pick(workers) == "b" for _ in range(10))
    router.started("silent")
    router.finished("silent", 0.05)  # it answered again: an ordinary estimate from now on
    clock.t += 60.0
    assert router.expected_finish("silent", workers) == router.expected_finish("b", workers) or \
        router.expected_finish("silent", workers) <= 2 * 0.05


def test_a_straggler_does_not_raise_the_bar_it_is_hedged_at() -> None:
    """Of two replicas the faster one sets the hedge delay: a silent replica's learnt latency
    (the waits it caused) must not lengthen the next wait, or hedges drift towards the timeout."""
    router = Router(RouterConfig(hedge_floor_s=0.5, hedge_factor=4.0), clock=Clock(), salt="t")
    for w, lat in (("fast", 0.2), ("silent", 10.0)):
        router.started(w)
        router.finished(w, lat)
    first = router.hedge_after(["fast", "silent"])
    for _ in range(5):  # the silent replica is hedged, then abandoned after each wait
        router.started("silent")
        router.abandoned("silent", router.hedge_after(["fast", "silent"]) + 0.2)
    assert first == router.hedge_after(["fast", "silent"]) == 0.8
    three = {"a": 0.2, "b": 0.3, "silent": 10.0}
    for w, lat in three.items():
        router.started(w)
        router.finished(w, lat)
    assert router.hedge_after(list(three)) <= 4.0 * 0.3
