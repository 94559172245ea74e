"""pytest-benchmark versions of the bench CLI's measurements.

    pytest benchmarks/ --benchmark-json=bench.json            # full sizes
    BSAM_BENCH_SMOKE=1 pytest benchmarks/ -q                  # CI: tiny sizes, few rounds

They check that each measurement runs, never a speed (speed targets are read off the
CLI's tables; see README).
"""
import os

import pytest
import torch
from bsam_fast import BSAM, available_backends
from bsam_fast.bench import layout_shapes
from bsam_fast.bench_e2e import training_step

SMOKE = os.environ.get("BSAM_BENCH_SMOKE") == "1"
SIZE = 20_000 if SMOKE else 10_000_000
LAYOUTS = ["one", "resnet20"] if SMOKE else ["one", "resnet20", "transformer", "tiny"]
BACKENDS = [b for b in available_backends() if b != "cuda"]
DEVICE = "cpu"


def run(benchmark, fn, setup=None):
    if SMOKE:
        return benchmark.pedantic(fn, setup=setup, rounds=3, warmup_rounds=1)
    return benchmark.pedantic(fn, setup=setup, rounds=20, warmup_rounds=3)


def params_and_grads(layout):
    shapes = layout_shapes(layout, SIZE)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [torch.randn(s) * 1e-2 for s in shapes]
    return params, grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bsam_optimizer_step(benchmark, backend, layout):
    if backend == "reference" and not SMOKE and layout == "tiny":
        pytest.skip("the reference loop on 400 tensors is only a smoke measurement")
    params, grads = params_and_grads(layout)
    opt = BSAM(params, lr=1e-3, num_data=50_000, backend=backend, seed=0)

    def put():
        for p, g in zip(params, grads):
            p.grad = g

    def step():
        opt.zero_grad(); opt.sample_noise(); put(); opt.perturb(); put(); opt.step()
    run(benchmark, step)
    benchmark.extra_info.update(backend=backend, layout=layout, numel=sum(p.numel() for p in params))
    assert not opt.in_step


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_step(benchmark, impl, layout):
    params, grads = params_and_grads(layout)
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=1e-3, **{impl: True})
    run(benchmark, opt.step)
    benchmark.extra_info.update(backend=f"adamw_{impl}", layout=layout)


@pytest.mark.parametrize("method", ["adam", "sam_adam"] + [f"bsam-{b}" for b in BACKENDS])
@pytest.mark.parametrize("model_name", ["mlp", "lenet5", "resnet20_frn"])
def test_training_step(benchmark, model_name, method):
    backend = method.split("-", 1)[1] if method.startswith("bsam") else None
    step = training_step(model_name, "bsam" if backend else method, backend, torch.device(DEVICE),
                         batch=8 if SMOKE else 64)
    run(benchmark, step)
    benchmark.extra_info.update(model=model_name, method=method)
