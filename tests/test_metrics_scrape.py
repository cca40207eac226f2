"""`/metrics` scraped over HTTP and parsed as Prometheus would parse it.

Parsing with ``prometheus_client``'s own parser (not string matching) is the point: a malformed
line, a duplicate family or a bad label escape fails here instead of in somebody's Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sentinel.bootstrap.monitor import SwarmMonitor
from sentinel.bootstrap.swarm_state import SwarmMemory, build_state, swarm_gauges
from sentinel.metrics import METRICS
from sentinel.net.http import (
    PROMETHEUS_CONTENT_TYPE,
    HTTPPortError,
    MetricsServer,
    start_metrics_server,
)
from sentinel.protocol.keys import progress_key, stage_key, verifiers_key
from tests.test_monitor import RUN, FakeDHT, V, W, claim, progress, verifier

REPO = Path(__file__).resolve().parents[1]


def scrape(url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float], dict[str, str]]:
    """(content type, {(sample name, sorted labels): value}, {family name: type})."""
    with urllib.request.urlopen(url, timeout=10) as r:
        ctype, text = r.headers.get("Content-Type", ""), r.read().decode()
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        assert family.name not in types, f"family {family.name} exposed twice"
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return ctype, samples, types


@pytest.fixture
def clean_metrics():
    """An empty process registry, so exact values can be asserted."""
    METRICS.reset()
    yield METRICS
    METRICS.reset()


def test_node_metrics_endpoint_parses(clean_metrics):
    METRICS.inc("sentinel_rejected_messages_total", 3, reason="forged_signature")
    METRICS.inc("sentinel_rejected_messages_total", reason='we"ird\\reason')
    METRICS.inc("sentinel_messages_total", 5, kind="request", direction="forward")
    METRICS.inc("sentinel_bytes_total", 1024, direction="in")
    METRICS.inc("sentinel_averaging_rounds_total")
    server = MetricsServer(port=0)
    try:
        ctype, samples, types = scrape(server.url)
    finally:
        server.close()
    assert ctype == PROMETHEUS_CONTENT_TYPE
    assert samples[("sentinel_rejected_messages_total", (("reason", "forged_signature"),))] == 3.0
    assert samples[("sentinel_rejected_messages_total", (("reason", 'we"ird\\reason'),))] == 1.0
    assert samples[("sentinel_messages_total", (("direction", "forward"), ("kind", "request")))] == 5.0
    assert samples[("sentinel_bytes_total", (("direction", "in"),))] == 1024.0
    assert samples[("sentinel_averaging_rounds_total", ())] == 1.0
    assert types["sentinel_rejected_messages"] == "counter"  # the parser strips _total from family names


def test_metrics_port_zero_is_off_and_a_taken_port_is_explained():
    assert start_metrics_server(0) is None and start_metrics_server(None) is None
    first = MetricsServer(port=0)
    try:
        with pytest.raises(HTTPPortError, match=f"127.0.0.1:{first.port}.*taken.*--metrics-port"):
            start_metrics_server(first.port)
    finally:
        first.close()


def test_monitor_metrics_are_swarm_level_plus_own_counters(clean_metrics):
    METRICS.inc("sentinel_rejected_records_total", 2, reason="forged_signature")
    dht = FakeDHT()
    dht.data[stage_key(RUN, 0)] = {W[0]: claim(0), W[1]: claim(0), W[2]: claim(0, "JOINING")}
    dht.data[stage_key(RUN, 1)] = {W[3]: claim(1)}
    dht.data[verifiers_key(RUN)] = {V[0]: verifier(), V[1]: verifier()}
    dht.data[progress_key(RUN)] = {
        V[0]: progress(7, [(6, 3.5), (7, 3.0)], val=[(5, 3.25)], tokens=700, tps=50.0, committee=[V[0], V[1]],
                       flags={"stage1/backward": 4}, rates={"stage1/backward": 0.25},
                       banned=[{"peer": W[1], "stage": 0, "step": 6, "votes": [V[0], V[1]], "reasons": ["l2"]}]),
        V[1]: progress(7, [(7, 2.0)], tokens=300, tps=25.0),
    }

    async def scenario() -> tuple:
        mon = SwarmMonitor(dht, RUN, 2, port=0, interval_s=60)
        url = await mon.start()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, scrape, url + "metrics")
        finally:
            await mon.stop()

    ctype, samples, types = asyncio.run(scenario())
    assert ctype == PROMETHEUS_CONTENT_TYPE

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("sentinel_swarm_stages") == 2
    assert value("sentinel_swarm_workers", stage="0", state="ONLINE") == 1
    assert value("sentinel_swarm_workers", stage="0", state="BANNED") == 1
    assert value("sentinel_swarm_workers", stage="0", state="JOINING") == 1
    assert value("sentinel_swarm_workers", stage="1", state="ONLINE") == 1
    assert value("sentinel_swarm_workers", stage="1", state="STALE") == 0  # zeros are exported too
    assert value("sentinel_swarm_verifiers", state="ONLINE") == 2
    assert value("sentinel_swarm_committee_size") == 2
    assert value("sentinel_swarm_bans") == 1 and value("sentinel_swarm_accused") == 0
    assert value("sentinel_swarm_step") == 7
    assert value("sentinel_swarm_tokens") == 1000 and value("sentinel_swarm_tokens_per_second") == 75.0
    assert value("sentinel_swarm_train_loss") == 2.5  # mean of the verifiers' latest step
    assert value("sentinel_swarm_val_loss") == 3.25
    assert value("sentinel_swarm_flags", stage="1", direction="backward") == 4
    assert value("sentinel_swarm_flag_rate", stage="1", direction="backward") == 0.25
    assert 0 <= value("sentinel_swarm_state_age_seconds") < 60
    assert value("sentinel_rejected_records_total", reason="forged_signature") == 2  # the bootstrap's own
    assert all(types[n] == "gauge" for n in types if n.startswith("sentinel_swarm_"))


def _metric_names_in_code() -> set[str]:
    names = set()
    for path in (REPO / "sentinel").rglob("*.py"):
        names |= set(re.findall(r'METRICS\.(?:inc|set)\(\s*"([a-z_:]+)"', path.read_text()))
    memory = SwarmMemory()
    names |= {g[0] for g in swarm_gauges(build_state(memory, 0.0, run=RUN, num_stages=1))}
    names |= {"sentinel_swarm_train_loss", "sentinel_swarm_val_loss", "sentinel_swarm_state_age_seconds"}
    return names


def test_every_metric_name_is_documented():
    doc = (REPO / "docs" / "metrics.md").read_text()
    names = _metric_names_in_code()
    assert len(names) > 15
    missing = sorted(n for n in names if f"`{n}" not in doc)
    assert not missing, f"document these metrics in docs/metrics.md: {missing}"


def _node_has_metrics_flag() -> bool:
    import contextlib
    import io

    from sentinel.cli.node import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["join", "--metrics-port", "0"])
    except SystemExit:
        return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.swarm
def test_a_real_node_serves_metrics(tmp_path):
    """`sentinel-node join --metrics-port` in a real process: scrapeable, and a taken port is an exit 3."""
    import os
    import subprocess
    import sys
    import time

    if not _node_has_metrics_flag():
        pytest.skip("sentinel-node join has no --metrics-port flag yet")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    maddr_file = tmp_path / "maddr"
    procs: list[subprocess.Popen] = []

    def spawn(*args: str) -> subprocess.Popen:
        log = open(tmp_path / f"node{len(procs)}.log", "wb")  # noqa: SIM115 - the child owns it
        p = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                             stdin=subprocess.DEVNULL)
        log.close()
        procs.append(p)
        return p

    def logs() -> str:
        return "\n".join(f.read_text(errors="replace")[-2000:] for f in sorted(tmp_path.glob("node*.log")))

    port = _free_port()
    try:
        spawn("-m", "sentinel.cli.bootstrap", "--new-swarm", "--no-monitor", "--identity-path",
              str(tmp_path / "b.id"), "--maddr-file", str(maddr_file))
        deadline = time.monotonic() + 180
        while not maddr_file.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, f"bootstrap did not start:\n{logs()}"
            time.sleep(0.2)
        maddr = maddr_file.read_text().split()[0]
        worker = spawn("-m", "sentinel.cli.node", "join", "--initial-peers", maddr, "--stage", "0",
                       "--metrics-port", str(port), "--status-every", "1",
                       "--throughput-cache", str(tmp_path / "throughput.json"))
        deadline = time.monotonic() + 300
        while True:
            try:
                ctype, samples, _ = scrape(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                assert time.monotonic() < deadline and worker.poll() is None, f"no /metrics from the node:\n{logs()}"
                time.sleep(0.5)
        assert ctype == PROMETHEUS_CONTENT_TYPE
        assert all(name.startswith("sentinel_") for name, _ in samples)

        # the volunteer's view: `sentinel-node status` reads /status beside /metrics
        def status(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "sentinel.cli.node", "status", "--metrics-port", str(port),
                                   *extra], capture_output=True, text=True, env=env, timeout=120)

        deadline = time.monotonic() + 300
        while True:
            r = status("--json")
            if r.returncode == 0 and json.loads(r.stdout).get("state") == "ONLINE":
                break
            assert time.monotonic() < deadline and worker.poll() is None, f"no ONLINE status:\n{r.stderr}\n{logs()}"
            time.sleep(0.5)
        st = json.loads(r.stdout)
        assert (st["role"], st["stage"], st["banned"], st["strikes"]) == ("worker", 0, False, 0)
        assert st["peers"] >= 1  # the bootstrap at least
        assert status().stdout.startswith("status: worker stage 0 ONLINE | step 0 |")
        deadline = time.monotonic() + 120
        while "status: worker stage 0 ONLINE" not in (tmp_path / "node1.log").read_text(errors="replace"):
            assert time.monotonic() < deadline, f"the node never printed its status line:\n{logs()}"
            time.sleep(0.5)
        # --throughput auto measured this machine once and cached it for the next start
        assert re.search(r"throughput: \d+ tokens/s on cpu \(measured\)", (tmp_path / "node1.log").read_text())
        assert json.loads((tmp_path / "throughput.json").read_text())
        second = spawn("-m", "sentinel.cli.node", "join", "--initial-peers", maddr, "--metrics-port", str(port))
        assert second.wait(timeout=120) == 3
        assert "port is taken" in (tmp_path / "node2.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
