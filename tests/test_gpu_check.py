"""benchmarks/gpu_check.sh's control flow, in its dry mode (no GPU, no build): every step
runs or says why not, the evidence script writes one JSON line per section, and at most 8
files land in $OUT (the device tool brings back no more)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from bsam_fast import _ops

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not _ops.has_kernel("cpu"), reason="the dry run uses the CPU kernels")
def test_dry_run_writes_at_most_8_files_with_every_step(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, BSAM_GPU_CHECK_BUDGET="300")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry"], env=env,
                          capture_output=True, text=True, timeout=600)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("build: NOT RUN", "kernels-loaded: exit 0", "evidence-noise: exit 0", "evidence-ops: exit 0",
                 "evidence-graph: exit 0", "tests: exit 0", "bench: exit 0", "bench-e2e: exit 0", "bench-compiled-one: exit 0"):
        assert f"step {step}" in summary, step
    records = [json.loads(line) for line in (out / "evidence.jsonl").read_text().splitlines()]
    assert [r["section"] for r in records] == ["noise", "ops", "graph"]
    assert records[0]["ok"] and records[1]["ok"] and records[2]["ran"] is False
    assert all(p["gpu_vs_cpu_kernel_mismatches"] == 0 for p in records[0]["pairs"])
    assert {"tests.xml", "tests.log", "bench.json", "bench_e2e.json"} <= set(files)
    bench = json.loads((out / "bench.json").read_text())
    assert {"cpu", "adamw_fused", "compiled"} <= {r["backend"] for r in bench}   # the peer's rows joined
    assert "e2e mlp sam_adam_m8" in summary and "bench cpu one" in summary


@pytest.mark.skipif(not _ops.has_kernel("cpu"), reason="the dry run uses the CPU kernels")
def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path):
    """A budget too small for the later steps: they are reported as not run, the exit code
    says so, and the summary is still written."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, BSAM_GPU_CHECK_BUDGET="8")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry"], env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode != 0
    assert "NOT RUN (no time left" in summary and "SOME STEPS FAILED" in summary
