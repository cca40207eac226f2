"""The monitor page in a real headless Chromium, against a real local swarm.

What a maintainer would check by eye, checked by a test: the page of a training swarm draws the
stage grid and the loss curve, and what it draws equals what ``/api/state`` says at that moment.
Debian's ``chromium`` and ``chromium-driver`` are driven through selenium; ``scripts/install-browser.sh``
installs them, and the test skips (saying why) only where they cannot be installed.

The page and the API both move every 2 s, so values are compared only when the page shows the
same state sequence number (``data-seq``) as the API answer, before and after reading the DOM.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sentinel.cli.swarm import LocalSwarm, SwarmConfig
from tests.conftest import assert_all_gone

pytestmark = pytest.mark.swarm

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1440,1000"]


def _browser_binaries() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def browser_binaries() -> tuple[str, str]:
    found = _browser_binaries()
    if found is None:
        script = REPO / "scripts" / "install-browser.sh"
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
        found = _browser_binaries()
        if found is None:
            pytest.skip("headless Chromium is not available and could not be installed "
                        f"({(result.stderr or result.stdout).strip() or 'no apt'}); "
                        "install Debian's chromium and chromium-driver to run this test")
    return found


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _wait(what: str, deadline_s: float, fn, interval: float = 1.0, swarm: LocalSwarm | None = None):
    """Poll ``fn`` until it returns something truthy; fail with ``what`` (and logs) at the deadline."""
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the server may not be up yet; keep polling
            last_error = e
        if swarm is not None and not swarm.bootstrap.alive:
            pytest.fail(f"bootstrap exited while waiting for {what}:\n{swarm.tail(swarm.bootstrap)}")
        time.sleep(interval)
    logs = "" if swarm is None else "\n".join(f"--- {n.name}\n{swarm.tail(n, 15)}" for n in [swarm.bootstrap, *swarm.nodes])
    pytest.fail(f"timed out after {deadline_s:.0f}s waiting for {what} (last error: {last_error})\n{logs}")


def _monitor_url(swarm: LocalSwarm) -> str | None:
    url = getattr(swarm, "monitor_url", None)  # launchers that read --monitor-url-file
    if url:
        return url
    m = re.search(r"monitor: (http://\S+)", swarm.bootstrap.log_path.read_text(errors="replace"))
    return m.group(1) if m else None


def _make_driver(chromium: str, chromedriver: str, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(60)
    return driver


READ_PAGE = """
const q = (s) => Array.from(document.querySelectorAll(s));
const svg = document.querySelector('#loss-chart svg');
const train = document.querySelector('#loss-chart path.train-line');
return {
  seq: document.body.dataset.seq,
  cells: q('.worker-cell').map((c) => [c.dataset.stage, c.dataset.state, c.dataset.peer]),
  stageRows: q('.stage-row').length,
  trainLossText: document.getElementById('kpi-train-loss').textContent,
  valLossText: document.getElementById('kpi-val-loss').textContent,
  stepText: document.getElementById('kpi-step').textContent,
  trainPoints: svg ? Number(svg.dataset.trainPoints) : -1,
  trainPathN: train ? Number(train.dataset.n) : -1,
  trainPathD: train ? train.getAttribute('d') : '',
  valPoints: q('#loss-chart circle.val-point').map((c) => [Number(c.dataset.step), Number(c.dataset.loss)]),
  flagRows: q('#flags-table tbody tr').length,
  verifierRows: q('#verifiers-table tbody tr[data-peer]').map((r) => [r.dataset.peer, r.dataset.state]),
  conn: document.getElementById('conn-pill').textContent,
};
"""


def _consistent_view(driver, api_url: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(page, api) read at the same state sequence number, or None to try again."""
    before = driver.execute_script("return document.body.dataset.seq")
    api = _get_json(api_url)
    page = driver.execute_script(READ_PAGE)
    if str(api["seq"]) != before or page["seq"] != before:
        return None
    return page, api


def test_monitor_page_renders_live_swarm(tmp_path, browser_binaries):
    from selenium.common.exceptions import WebDriverException

    chromium, chromedriver = browser_binaries
    cfg = SwarmConfig(stages=2, replicas=1, verifiers=1, steps=40, malicious=0, eval_every=10)
    swarm = LocalSwarm(cfg, tmp_path / "swarm")
    driver = None
    t0 = time.monotonic()
    try:
        swarm.start()
        url = _wait("the monitor URL in the bootstrap's output", 120, lambda: _monitor_url(swarm), swarm=swarm)
        api_url = url + "api/state"

        def training() -> dict[str, Any] | None:
            s = _get_json(api_url)
            online = [c for st in s["stages"] for c in st["workers"] if c["state"] == "ONLINE"]
            p = s["progress"]
            ready = len(online) == cfg.stages * cfg.replicas and p["step"] >= 3 and len(p["train_loss"]) >= 3 \
                and p["val_loss"]
            return s if ready else None

        _wait("the swarm to train (every stage ONLINE, 3 steps, a validation loss)", 600, training, swarm=swarm)
        startup_s = time.monotonic() - t0

        try:
            driver = _make_driver(chromium, chromedriver, tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
        except WebDriverException as e:
            pytest.fail(f"chromedriver could not start {chromium}: {e.msg}")
        driver.get(url)
        page, api = _wait("the page to render the same state as /api/state", 120,
                          lambda: _consistent_view(driver, api_url), interval=0.3)

        # the stage grid: one row per stage, one cell per worker the API lists, states included
        assert page["stageRows"] == api["num_stages"] == cfg.stages
        api_cells = sorted([str(st["stage"]), c["state"], c["peer"]] for st in api["stages"] for c in st["workers"])
        assert sorted(page["cells"]) == api_cells
        online = [c for c in page["cells"] if c[1] == "ONLINE"]
        assert len(online) == api["counts"]["workers"]["ONLINE"] == cfg.stages * cfg.replicas
        assert {c[2] for c in online} == {n.peer_id for n in swarm.workers}

        # the loss curve and the numbers beside it are the API's
        p = api["progress"]
        assert page["trainLossText"] == f"{p['latest_train_loss']:.4f}"
        assert page["valLossText"] == f"{p['latest_val_loss']:.4f}"
        assert page["stepText"] == f"{p['step']:,}"
        assert page["trainPoints"] == page["trainPathN"] == len(p["train_loss"]) >= 3
        assert page["trainPathD"].count("L") == len(p["train_loss"]) - 1
        assert page["valPoints"] == [[s, v] for s, v in p["val_loss"]]
        assert page["flagRows"] == cfg.stages
        assert sorted(page["verifierRows"]) == sorted([v["peer"], v["state"]] for v in api["verifiers"])
        assert {v[0] for v in page["verifierRows"]} == {n.peer_id for n in swarm.verifiers}
        assert page["conn"] == "live"

        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1440, "height": int(height), "deviceScaleFactor": 1, "mobile": False})
        shot = tmp_path / "monitor.png"
        assert driver.save_screenshot(str(shot)), "Chromium returned no screenshot"
        assert shot.stat().st_size > 20_000, "screenshot is suspiciously small (blank page?)"
        print(f"\nmonitor screenshot: {shot} (swarm training after {startup_s:.0f}s)")

        with urllib.request.urlopen(url + "metrics", timeout=10) as r:
            from prometheus_client.parser import text_string_to_metric_families

            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        workers = families["sentinel_swarm_workers"].samples
        assert sum(s.value for s in workers if s.labels["state"] == "ONLINE") == cfg.stages * cfg.replicas
    finally:
        if driver is not None:
            driver.quit()
        swarm.stop()
    assert_all_gone(swarm.all_pids())
