"""GPU tests of the "cuda" backend (marker gpu: skipped without a CUDA device).

Run on a GPU machine by benchmarks/gpu_check.sh.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bsam_fast import BSAM, _ops
from bsam_fast import reference as ref
from bsam_fast.noise import noise_bases, normal_like
from conftest import GOLDEN_DIR
from golden import replay
from helpers import make_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() and _ops.has_kernel("cuda")),
                                 reason="needs a CUDA GPU and the CUDA kernels")]
ops = torch.ops.bsam_fast
DEV = "cuda"


def rand(shapes, dtype=torch.float32, positive=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g).to(dtype).to(DEV) for s in shapes]
    return [t.abs() + 0.5 for t in out] if positive else out


SHAPES = [(33, 17), (5,), (1,), (4, 3, 3, 3), (300_001,), (64, 64, 3, 3)]


def test_noise_is_the_cpu_stream():
    """Same (seed, offset, index) -> the same xi on CPU and GPU (within 2 ulp; expected equal)."""
    shapes = SHAPES + [(7,)] * 300
    bases = noise_bases([torch.Size(s).numel() for s in shapes])
    cpu = normal_like([torch.empty(s) for s in shapes], bases, 0xDEADBEEF, 12345)
    gpu = _ops.normal([torch.empty(s, device=DEV) for s in shapes], bases, 0xDEADBEEF, 12345)
    for a, b in zip(cpu, gpu):
        a, b = a.numpy(), b.cpu().numpy()
        ulps = np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))
        assert ulps.max() <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_phases_match_reference(dtype):
    op = torch.float32 if dtype == torch.bfloat16 else dtype
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else \
        dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else {}
    p0, w, s, g, u0, gm = (rand(SHAPES, dtype, seed=1), rand(SHAPES, op, seed=2), rand(SHAPES, op, True, 3),
                           rand(SHAPES, dtype, seed=4), rand(SHAPES, op, True, 5), rand(SHAPES, op, seed=6))
    bases = noise_bases([torch.Size(x).numel() for x in SHAPES])
    params, means = [x.clone() for x in p0], [torch.empty_like(x) for x in w]
    ops.sample_(params, means, s, bases, 300.0, 7, 9, True, None)
    xi = [x.to(DEV) for x in normal_like([x.cpu() for x in params], bases, 7, 9, dtype=op)]
    for p, p_in, z, prec in zip(params, p0, xi, s):
        torch.testing.assert_close(p, ref.noisy_point(p_in.to(op), prec, z, 300.0).to(dtype), **tol)
    params, u, found = [x.clone() for x in p0], [x.clone() for x in u0], torch.zeros(1, device=DEV)
    ops.perturb_(params, g, w, s, u, 0.05, torch.tensor([0.5], device=DEV), False, found)
    assert found.item() == 0
    for i in range(len(SHAPES)):
        gg = g[i].to(op) * 0.5
        torch.testing.assert_close(u[i], u0[i] + ref.gradient_magnitude(s[i], gg), **tol)
        torch.testing.assert_close(params[i], ref.perturbed_point(w[i], s[i], gg, 0.05).to(dtype), **tol)
    params, means, momenta, precs = [x.clone() for x in p0], [x.clone() for x in w], [x.clone() for x in gm], [x.clone() for x in s]
    _ops.update_(params, means, momenta, precs, g, u0, 0.5, 0.5, torch.tensor(0.03, device=DEV), 0.9, 0.99, 1e-3, 0.1, True)
    for i in range(len(SHAPES)):
        gg = g[i].to(op) * 0.5
        gm_new = ref.momentum_update(gm[i], gg, w[i], 0.9, 1e-3)
        w_new = ref.mean_update(w[i], gm_new, s[i], 0.03)
        torch.testing.assert_close(momenta[i], gm_new, **tol)
        torch.testing.assert_close(means[i], w_new, **tol)
        torch.testing.assert_close(precs[i], ref.precision_update(s[i], u0[i] * 0.5, 0.99, 0.1, 1e-3), **tol)
        torch.testing.assert_close(params[i], w_new.to(dtype), **tol)


def test_training_matches_cpu_backends():
    results = []
    for backend, device in (("cuda", DEV), ("reference", "cpu")):
        model = make_model().to(device)
        opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend=backend, seed=11)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            x, y = torch.randn(16, 1, 5, 5, generator=g).to(device), torch.randint(0, 3, (16,), generator=g).to(device)
            opt.step(lambda: (opt.zero_grad(), F.cross_entropy(model(x), y).backward()))
        results.append({n: (p.detach().cpu(), opt.state[p]["precision"].cpu()) for n, p in model.named_parameters()})
    for n in results[0]:
        for a, b in zip(results[0][n], results[1][n]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", sorted(GOLDEN_DIR.glob("*.npz")), ids=lambda p: p.name)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_golden_parity_on_cuda(path, dtype, tol):
    for step, worst, _, _ in replay(path, "cuda", dtype, device=DEV):
        assert max(worst.values()) <= tol, (step, worst)


def test_amp_overflow_changes_nothing_and_does_not_synchronise():
    model = make_model().to(DEV)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="cuda", seed=1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    x, y = torch.randn(16, 1, 5, 5, device=DEV), torch.randint(0, 3, (16,), device=DEV)

    def amp_step(poison):
        opt.sample_noise()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if poison:
            model.fc1.weight.grad[0, 0] = float("inf")
        opt.perturb(grad_scaler=scaler)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        torch.cuda.set_sync_debug_mode("error")      # the optimizer's part must not sync
        try:
            opt.step()  # what scaler.step() calls, after it set grad_scale/found_inf
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.zero_grad()
    # through the scaler once (it reads found_inf itself), then the bare step without syncs
    opt.sample_noise(); scaler.scale(F.cross_entropy(model(x), y)).backward(); opt.perturb(grad_scaler=scaler)
    scaler.scale(F.cross_entropy(model(x), y)).backward(); scaler.step(opt); scaler.update(); opt.zero_grad()
    before = {k: v.clone() for p in model.parameters() for k, v in opt.state[p].items()}
    weights = [p.detach().clone() for p in model.parameters()]
    amp_step(poison=True)
    after = {k: v for p in model.parameters() for k, v in opt.state[p].items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights))
    assert opt.skipped_steps == 1


def test_cuda_graph_replay_equals_eager():
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 5, 5, device=DEV), torch.randint(0, 3, (16,), device=DEV)
    eager, graphed = make_model().to(DEV), make_model().to(DEV)
    lr = torch.tensor(0.05, device=DEV)
    opt_e = BSAM(eager.parameters(), lr=0.05, num_data=100, backend="cuda", seed=5)
    opt_g = BSAM(graphed.parameters(), lr=lr, num_data=100, backend="cuda", seed=5, capturable=True)

    def step(model, opt):
        opt.sample_noise()
        F.cross_entropy(model(x), y).backward()
        opt.perturb()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):                       # warm-up allocates the state and scratch
            step(graphed, opt_g)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        step(eager, opt_e)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, opt_g)
    for i in range(4):
        graph.replay()
        step(eager, opt_e)
        torch.cuda.synchronize()
        for (n, pe), pg in zip(eager.named_parameters(), graphed.parameters()):
            torch.testing.assert_close(pg, pe, rtol=1e-6, atol=1e-7, msg=f"replay {i}: {n}")
            torch.testing.assert_close(opt_g.state[pg]["precision"], opt_e.state[pe]["precision"], rtol=1e-6, atol=1e-7)
    assert opt_g.noise_offset == opt_e.noise_offset   # the counter advanced on the device


def test_bf16_autocast_training():
    torch.manual_seed(0)
    model = make_model().to(DEV)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="cuda", seed=2)
    x, y = torch.randn(64, 1, 5, 5, device=DEV), torch.randint(0, 3, (64,), device=DEV)
    losses = []
    for _ in range(30):
        def closure():
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(float(opt.step(closure)))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_hundreds_of_small_tensors_match_reference():
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 300, (700,), generator=g)]
    results = []
    for backend, device in (("cuda", DEV), ("reference", "cpu")):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(device))
                  for i, s in enumerate(shapes)]
        opt = BSAM(params, lr=0.05, num_data=100, backend=backend, seed=3)
        for step in range(2):
            opt.sample_noise()
            for p in params:
                p.grad = torch.sin(p.detach() * 3 + step)
            opt.perturb()
            for p in params:
                p.grad = torch.cos(p.detach() * 2 - step)
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tensor_over_2_pow_31_elements():
    n = 2 ** 31 + 4099
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16, device=DEV))
    opt = BSAM([p], lr=0.5, num_data=4.0, rho=0.0, backend="cuda", seed=9)
    opt.sample_noise()
    tail = p.detach()[-8:].float().clone()
    p.grad = torch.ones_like(p)
    opt.perturb()
    p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[p]
    # noise reached the tail (std 1/sqrt(4*1) = 0.5), and every element was updated
    assert tail.abs().max() > 0
    assert torch.all(state["momentum"][-4099:] == 0.1)
    assert torch.all(state["momentum"][:4099] == 0.1)
    start = (n - 8) // 4 * 4                    # the stream is drawn in blocks of 4
    z = normal_like([torch.empty(n - start)], [start], 9, 0)[0][n - 8 - start:]
    torch.testing.assert_close(tail, (z * 0.5).to(torch.bfloat16).float())
