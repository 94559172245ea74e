"""The benchmark CLI runs and writes what it promises (its timings are not checked)."""
import json
import math

import pytest

from bsam_fast import available_backends, bench

FIELDS = {"backend", "device", "device_name", "dtype", "layout", "numel", "ntensors", "median_ms", "gbps",
          "pct_copy_bw", "ratio_vs_adamw_fused", "ratio_vs_reference", "state_bytes"}


@pytest.mark.parametrize("layout", bench.LAYOUTS)
def test_layouts_have_about_the_requested_size(layout):
    shapes = bench.layout_shapes(layout, 2_000_000)
    numel = sum(math.prod(s) for s in shapes)
    assert 0.5 < numel / 2_000_000 < 1.6
    assert len(shapes) == {"one": 1, "resnet20": 86, "transformer": 144, "tiny": 400}[layout]


def test_bytes_model():
    assert sum(bench.bsam_bytes(10, 4, 4).values()) == 720          # 72 B per fp32 parameter
    assert bench.adamw_bytes(10, 4, 4) == 280
    assert sum(bench.bsam_bytes(10, 2, 4).values()) == 10 * (10 + 16 + 2 + 32)   # bf16, fp32 master


def test_cli_writes_json_table_and_plot(tmp_path, capsys):
    backends = [b for b in available_backends() if b in ("cpu", "foreach", "reference")]
    out = bench.main(["--sizes", "3000", "--layouts", "one", "tiny", "--backends", *backends,
                      "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"), "--no-progress",
                      "--end-to-end", "--models", "lenet5"])
    records = json.loads((tmp_path / "r.json").read_text())["ops"]
    assert {r["backend"] for r in records} == {"adamw_fused", "adamw_foreach", *backends}
    for r in records:
        assert FIELDS <= r.keys()
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["state_bytes"] > 0
    ref = [r for r in records if r["backend"] == "reference"]
    assert all(r["ratio_vs_reference"] == 1.0 for r in ref)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "t/t_AdamWfused" in text and "x SAM-Adam" in text
    assert {e["method"] for e in out["end_to_end"]} >= {"adam", "sam_adam"}


def test_cli_refuses_too_few_repetitions():
    with pytest.raises(SystemExit):
        bench.main(["--reps", "5"])
