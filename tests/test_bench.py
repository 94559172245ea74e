"""The benchmark CLI runs and writes what it promises (its timings are not checked)."""
import json
import math
import pathlib

import pytest
import torch

from bsam_fast import available_backends, bench

FIELDS = {"backend", "device", "device_name", "dtype", "layout", "numel", "ntensors", "median_ms", "gbps",
          "pct_copy_bw", "ratio_vs_adamw_fused", "ratio_vs_reference", "state_bytes"}


@pytest.mark.parametrize("layout", [layout for layout in bench.LAYOUTS if layout != "host"])
def test_layouts_have_about_the_requested_size(layout):
    shapes = bench.layout_shapes(layout, 2_000_000)
    numel = sum(math.prod(s) for s in shapes)
    assert 0.5 < numel / 2_000_000 < 1.6
    assert len(shapes) == {"one": 1, "resnet20": 86, "transformer": 144, "tiny": 400}[layout]


def test_host_layout_times_400_and_86_tensors_of_16_against_fused_adamw(tmp_path):
    """The host-overhead rows: whatever --sizes says, 400 and 86 tensors of 16 elements."""
    backends = [b for b in available_backends() if b in ("cpu", "foreach")]
    bench.main(["--sizes", "1e6", "--layouts", "host", "--backends", *backends, "--no-progress",
                "--json", str(tmp_path / "host.json")])
    rows = {(r["backend"], r["ntensors"], r["numel"]) for r in json.loads((tmp_path / "host.json").read_text())}
    for backend in ["adamw_fused", *backends]:
        assert {(backend, 400, 6400), (backend, 86, 1376)} <= rows


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
    rows = {e["method"]: e for e in out["end_to_end"]}
    assert {"adam", "sam_adam", "sam_adam_m8"} <= rows.keys()
    for label, row in rows.items():      # m = 8 rows also against SAM-Adam with m = 8
        same_m = rows["sam_adam_m8" if "_m8" in label else "sam_adam"]["median_ms"]
        assert row["overhead_vs_sam_adam_same_m"] == pytest.approx(row["median_ms"] / same_m)


@pytest.mark.parametrize("method", ["adam", "sam_adam", "sam_adam_m8", "bsam", "bsam_m8", "bsam_m8_batched"])
def test_every_end_to_end_method_trains_the_transformer(method):
    from bsam_fast.bench_e2e import training_step
    torch.manual_seed(0)
    step = training_step("transformer_stack", method, "foreach", torch.device("cpu"), batch=16)
    before = {n: p.detach().clone() for n, p in step.model.named_parameters()}
    step()
    assert all(not torch.equal(before[n], p) for n, p in step.model.named_parameters())


def test_cli_refuses_too_few_repetitions():
    with pytest.raises(SystemExit):
        bench.main(["--reps", "5"])


def test_the_compiled_peer_computes_the_reference_update():
    """The peer's phases (run eagerly here; the bench compiles them) give the reference
    backend's results for the same noise and gradients."""
    import torch
    from bsam_fast import BSAM, compiled_peer
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(2)]
    noise = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    hyper = dict(lr=0.01, num_data=100, rho=0.05, weight_decay=1e-3, damping=0.1)
    opt = BSAM(params, **hyper, backend="reference", seed=0)
    ours = [p.detach().clone() for p in params]
    means = [p.clone() for p in ours]
    momenta = [torch.zeros_like(p) for p in ours]
    precisions = [torch.ones_like(p) for p in ours]
    u_sums = [torch.zeros_like(p) for p in ours]
    opt.sample_noise(noise)
    compiled_peer.sample(ours, means, precisions, 100.0, noise=noise)
    assert all(torch.equal(a, b) for a, b in zip(params, ours))
    for p, gr in zip(params, grads[0]):
        p.grad = gr
    opt.perturb()
    compiled_peer.perturb(ours, means, precisions, u_sums, grads[0], 0.05)
    assert all(torch.equal(a, b) for a, b in zip(params, ours))
    for p, gr in zip(params, grads[1]):
        p.grad = gr
    opt.step()
    compiled_peer.update(ours, means, momenta, precisions, u_sums, grads[1], 0.01, 0.9, 0.999, 1e-3, 0.1)
    for p, a, gm, s in zip(params, ours, momenta, precisions):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-15)
        torch.testing.assert_close(gm, opt.state[p]["momentum"], rtol=0, atol=1e-15)
        torch.testing.assert_close(s, opt.state[p]["precision"], rtol=0, atol=1e-15)


@pytest.mark.skipif("cpu" not in available_backends(), reason="the cpu kernels are not built")
def test_the_batched_step_profile_runs_and_writes_its_floor(tmp_path):
    import runpy
    import sys
    out = tmp_path / "breakdown.txt"
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["profile_batched.py", "--steps", "2", "--out", str(out)]
    try:
        runpy.run_path(str(pathlib.Path(__file__).parents[1] / "benchmarks" / "profile_batched.py"),
                       run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)       # the script runs on one thread
    text = out.read_text()
    for stage in ("m noisy points", "2 vmap'd forward/backward passes", "m perturbations", "update", "floor"):
        assert stage in text, text
