"""`seqfoundry demo`, the README's main job for now, end to end as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_trains_decodes_and_writes_its_run_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", "experiment=tiny", "model=gru",
         "demo.steps=250", f"run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("greedy", "beam5", "sample"):
        assert name in proc.stdout
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert set(results) == {"greedy", "beam5", "sample"}
    assert results["greedy"]["exact_match"] > 0.8
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 250 and json.loads(lines[-1])["step"] == 250
    assert "arch: gru" in (tmp_path / "config.yaml").read_text()
