"""Smoke test of scripts/benchmark.py --quick: it runs end to end, prints one table and its verdicts, writes JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MRNGAN_IXI_DIR", None)  # the phantom cohort: small and always there
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    text = proc.stdout
    assert "measure" in text and "cpu 64px" in text
    assert "CHECK PASS [cpu 64px] one-slice reconstruction batches both directions together" in text
    assert "TARGET" in text and "SCALING" in text and "SUMMARY" in text
    res = json.loads(out.read_text())
    col = res["results"]["cpu 64px"]
    for stage in ("slice_localization", "brain_generalization", "flow_generation", "mrngan"):
        assert col["train"][stage]["it_per_s"] > 0
        assert col["loaders"][stage]["slices_per_s"] > 0
    rec = col["recon"]
    assert rec["batch_sizes"] == {"pix2pix": [2], "cell": [2]}
    assert rec["one_slice"]["prior_fits"] == 1 and rec["one_slice"]["slices"] > rec["one_slice_half"]["slices"]
    assert rec["every_8th"]["inputs"] > 1 and rec["pix2pix_iterative"]["total_s"] > 0
    assert col["samplers"], "benchmark_slices.py rows missing"
    assert {t["target"] for t in res["targets"]}
    assert len(res["table"]) > 20
    # the summary of the issue-12 targets: exactly these keys, all measured
    assert set(res["summary"]) == {"one_slice_s", "rollout_s", "every8_s", "generation_ratio", "peak_rss_gib", "prior_cache_s"}
    assert all(isinstance(v, float) and v > 0 for v in res["summary"].values()), res["summary"]
    assert "scaled" in res["summary_notes"] and rec["prior_cache"]["volumes"] == 1
    assert rec["one_slice"]["localization_refine_s"] > 0 and rec["one_slice"]["localization_cnn_s"] > 0
    assert {t["target"] for t in res["targets"]} >= {"one_slice_s", "every8_s", "generation_ratio", "peak_rss_gib", "prior_cache_s"}
