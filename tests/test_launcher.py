"""The local launcher's console: the progress line, and what it says of the attack it runs."""

from __future__ import annotations

import time
from types import SimpleNamespace

from sentinel.cli.swarm import SwarmConfig, _progress_printer, main


def test_progress_line_shows_a_dash_until_the_first_figures(capsys) -> None:
    rows = [{"step": 0, "steps": 60}, {"step": 3, "steps": 60, "train_loss": 3.14159, "val_loss": None,
                                       "tokens": 600, "train_seconds": 2.0, "banned": ["x"]}]
    swarm = SimpleNamespace(progress=lambda: rows, cfg=SwarmConfig(), started_at=time.time())
    _progress_printer(plain=False)(swarm)
    line = capsys.readouterr().out
    assert "None" not in line
    assert "v0 step 0/60 loss - val -" in line
    assert "v1 step 3/60 loss 3.142 val - 300 tok/s bans 1" in line


def test_a_bad_attack_spec_is_refused_before_any_process_starts(tmp_path, capsys) -> None:
    assert main(["--attack", "gausian", "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "gausian" in err and "Did you mean 'gaussian'" in err
    assert not (tmp_path / "run").exists()
