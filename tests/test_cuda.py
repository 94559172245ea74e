"""Tests of the "cuda" backend (marker gpu: skipped without a CUDA device).

Run on a GPU machine by benchmarks/gpu_check.sh. The op-level tests run on the CPU kernels
too (device "cpu"), so that what they check is checked in every CI run.
"""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bsam_fast import BSAM, _ops
from bsam_fast.backends import reference as ref
from bsam_fast.noise import noise_bases, normal_like
from conftest import GOLDEN_DIR
from golden import replay
from helpers import amp_parts, make_model

HAVE_CUDA = torch.cuda.is_available() and _ops.has_kernel("cuda")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU and the CUDA kernels")]
ops = torch.ops.bsam_fast
DEV = "cuda"
# The op-level tests: the CPU kernels, and the CUDA kernels where there is a GPU.
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not _ops.has_kernel("cpu"), reason="CPU kernels not built")),
           pytest.param("cuda", marks=gpu)]
GOLDEN_FILES = sorted(GOLDEN_DIR.glob("*.npz"))


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 convolutions and matmuls in full fp32 (cuDNN allows TF32 by default: ~5e-4)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rand(shapes, dtype, device, positive=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device) for s in shapes]
    return [t.abs() + 0.5 for t in out] if positive else out


def with_offset_view(ts, index):
    """ts with ts[index] replaced by an equal view at storage offset 1 (unaligned)."""
    t = ts[index]
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    out = list(ts)
    out[index] = view
    return out


# An empty tensor, odd lengths and tails of 1-3; the tests make the last one (7 elements: a
# quad and a tail of 3) a view at a storage offset, so that the scalar path runs.
SHAPES = [(33, 17), (5,), (0,), (1,), (4, 3, 3, 3), (300_001,), (64, 64, 3, 3), (7,)]


@pytest.mark.parametrize("seed,offset", [(0xDEADBEEF, 12345), (2 ** 64 - 1, 2 ** 32 + 7), (0, 0)])
@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_the_defined_stream(device, seed, offset):
    """The kernel's normals equal noise.normal_like's bit for bit: 0 ulp, also over > 320
    tensors (several launches) and an empty one."""
    shapes = SHAPES + [(7,)] * 330
    bases = noise_bases([torch.Size(s).numel() for s in shapes])
    defined = normal_like([torch.empty(s) for s in shapes], bases, seed, offset)
    got = _ops.normal([torch.empty(s, device=device) for s in shapes], bases, seed, offset)
    a = torch.cat([t.reshape(-1) for t in defined]).numpy().view(np.int32)
    b = torch.cat([t.reshape(-1) for t in got]).cpu().numpy().view(np.int32)
    mismatches = int((a != b).sum())
    assert mismatches == 0, f"{mismatches} of {a.size} draws differ"


@pytest.mark.parametrize("start", [1, 2, 3, 5, 81])
@pytest.mark.parametrize("device", DEVICES)
def test_a_shard_that_starts_mid_block_draws_the_defined_stream(device, start):
    """FSDP2 shards start where their rows do (a base not a multiple of 4): the fused
    backends draw them through _normals_from, which must give the defined stream's numbers
    at those indices, bit for bit."""
    from bsam_fast.backends.fused import _normals_from
    bases, shapes = [8 + start, 8, 40 + start], [(2, 13), (5,), (0,)]
    defined = normal_like([torch.empty(s) for s in shapes], bases, 0xBEEF, 3)
    got = _normals_from(bases, [torch.empty(s, device=device) for s in shapes], 0xBEEF, 3)
    for want, have in zip(defined, got):
        assert have.device.type == device and torch.equal(have.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_phases_match_reference(device, dtype):
    op = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    tol = dict(rtol=1e-6, atol=1e-7) if op == torch.float32 and dtype == op else \
        dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else {}
    p0, w, s, g, u0, gm = (rand(SHAPES, dtype, device, seed=1), rand(SHAPES, op, device, seed=2),
                           rand(SHAPES, op, device, True, 3), rand(SHAPES, dtype, device, seed=4),
                           rand(SHAPES, op, device, True, 5), rand(SHAPES, op, device, seed=6))
    p0, g = with_offset_view(p0, -1), with_offset_view(g, -1)
    bases = noise_bases([torch.Size(x).numel() for x in SHAPES])
    params, means = [x.clone() for x in p0], [torch.empty_like(x) for x in w]
    ops.sample_(params, means, s, bases, 300.0, 7, 9, True, None)
    xi = [x.to(device) for x in normal_like([x.cpu() for x in params], bases, 7, 9, dtype=op)]
    for p, p_in, z, prec in zip(params, p0, xi, s):
        torch.testing.assert_close(p, ref.noisy_point(p_in.to(op), prec, z, 300.0).to(dtype), **tol)
    params, u, found = [x.clone() for x in p0], [x.clone() for x in u0], torch.zeros(1, device=device)
    ops.perturb_(params, g, w, s, u, 0.05, torch.tensor([0.5], device=device), False, found)
    assert found.item() == 0
    for i in range(len(SHAPES)):
        gg = g[i].to(op) * 0.5
        torch.testing.assert_close(u[i], u0[i] + ref.gradient_magnitude(s[i], gg), **tol)
        torch.testing.assert_close(params[i], ref.perturbed_point(w[i], s[i], gg, 0.05).to(dtype), **tol)
    params, means, momenta, precs = [x.clone() for x in p0], [x.clone() for x in w], [x.clone() for x in gm], [x.clone() for x in s]
    # Tensor arguments in the arithmetic's dtype: a float32 0.03 is not the float64 0.03.
    lr = torch.tensor(0.03, dtype=op, device=device)
    _ops.update_(params, means, momenta, precs, g, u0, torch.tensor(0.5, dtype=op, device=device), 0.5, lr,
                 0.9, 0.99, 1e-3, 0.1, True)
    for i in range(len(SHAPES)):
        gg = g[i].to(op) * 0.5
        gm_new = ref.momentum_update(gm[i], gg, w[i], 0.9, 1e-3)
        w_new = ref.mean_update(w[i], gm_new, s[i], 0.03)
        torch.testing.assert_close(momenta[i], gm_new, **tol)
        torch.testing.assert_close(means[i], w_new, **tol)
        torch.testing.assert_close(precs[i], ref.precision_update(s[i], u0[i] * 0.5, 0.99, 0.1, 1e-3), **tol)
        torch.testing.assert_close(params[i], w_new.to(dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_in_a_tail_is_flagged(device, dtype):
    for bad in (float("inf"), float("nan")):
        g = with_offset_view(rand(SHAPES, dtype, device, seed=4), -1)
        g[-1][-1] = bad                                   # the last element of a 7-element tail
        found = torch.zeros(1, device=device)
        ops.check_finite_(g, found)
        assert found.item() == 1.0
        op = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        w, s = rand(SHAPES, op, device, seed=2), rand(SHAPES, op, device, True, 3)
        params, u, found = rand(SHAPES, dtype, device, seed=1), [torch.empty_like(x) for x in w], torch.zeros(1, device=device)
        ops.perturb_(params, g, w, s, u, 0.05, None, True, found)
        assert found.item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_skip_if_puts_the_mean_back_and_writes_nothing_else(device, dtype):
    op = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    p, w, gm, s = rand(SHAPES, dtype, device, seed=1), rand(SHAPES, op, device, seed=2), \
        rand(SHAPES, op, device, seed=3), rand(SHAPES, op, device, True, 4)
    g, u = rand(SHAPES, dtype, device, seed=5), rand(SHAPES, op, device, True, 6)
    w0, gm0, s0 = [x.clone() for x in w], [x.clone() for x in gm], [x.clone() for x in s]
    _ops.update_(p, w, gm, s, g, u, 1.0, 1.0, 0.1, 0.9, 0.999, 0.0, 0.1, True, torch.ones(1, device=device))
    for i in range(len(SHAPES)):
        assert torch.equal(w[i], w0[i]) and torch.equal(gm[i], gm0[i]) and torch.equal(s[i], s0[i])
        assert torch.equal(p[i], w0[i].to(dtype))


def _train(backend, device, steps=3, dtype=torch.float32):
    model = make_model(dtype=dtype).to(device)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend=backend, seed=11)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 1, 5, 5, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, 3, (16,), generator=g).to(device)
        opt.step(lambda: (opt.zero_grad(), F.cross_entropy(model(x).float(), y).backward()))
    return {(n, k): v.detach().cpu() for n, p in model.named_parameters()
            for k, v in [("param", p), *opt.state[p].items()]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_training_matches_other_backends(device, dtype):
    """Every parameter's mean, momentum and precision (and fp32 master), keyed by (name,
    state): fp32 against `reference` on the CPU; fp16 parameters against `foreach` on the
    same GPU (the same fp16 forward/backward numerics)."""
    got = _train("cuda", device, dtype=dtype)
    want = _train("reference", "cpu", dtype=dtype) if dtype == torch.float32 else _train("foreach", device, dtype=dtype)
    assert got.keys() == want.keys()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key].double(), **tol, msg=str(key))


@pytest.mark.parametrize("path", GOLDEN_FILES or [None], ids=lambda p: p.name if p else "no-golden-files")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_golden_parity_on_cuda(device, path, dtype, tol):
    # On a GPU run, no golden file is a failure (gpu_check.sh carries them; BSAM_GOLDEN_DIR).
    assert path is not None, f"no golden .npz in {GOLDEN_DIR} (set BSAM_GOLDEN_DIR)"
    for step, worst, _, _ in replay(path, "cuda", dtype, device=device):
        assert max(worst.values()) <= tol, (step, worst)


@contextlib.contextmanager
def _sync_is_an_error():
    """Inside: a host synchronisation raises (torch.cuda.set_sync_debug_mode("error"))."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_amp_overflow_changes_nothing_and_does_not_synchronise(device, capturable):
    model = make_model().to(device)
    opt = BSAM(model.parameters(), lr=torch.tensor(0.05, device=device), num_data=100, backend="cuda", seed=1,
               capturable=capturable)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    x, y = torch.randn(16, 1, 5, 5, device=device), torch.randint(0, 3, (16,), device=device)
    amp_parts(model, opt, scaler, x, y)     # through the scaler once (it reads found_inf itself)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = {(n, k): v.clone() for n, p in model.named_parameters() for k, v in opt.state[p].items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    amp_parts(model, opt, scaler, x, y, poison=True)
    with _sync_is_an_error():                        # the optimizer's part must not sync
        opt.step()                                   # finished without scaler.step
    opt.zero_grad()
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(before[(n, k)], v), (n, k)
        assert torch.equal(weights[n], p.detach()), n
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_a_default_step_never_synchronises_and_reports_a_skip_later(device):
    """No GradScaler, not capturable: no phase waits for the device (sync debug mode
    "error"), a non-finite step is skipped on the device, and its warning comes at a later
    step once the device has got there."""
    model = make_model().to(device)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="cuda", seed=3)
    x, y = torch.randn(16, 1, 5, 5, device=device), torch.randint(0, 3, (16,), device=device)

    def one_step(poison=False):
        opt.zero_grad()
        with _sync_is_an_error():
            opt.sample_noise()
        F.cross_entropy(model(x), y).backward()
        if poison:
            model.fc2.weight.grad[0, 0] = float("nan")
        with _sync_is_an_error():
            opt.perturb()
        F.cross_entropy(model(x), y).backward()
        with _sync_is_an_error():
            opt.step()
    for _ in range(3):
        one_step()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(poison=True)
    for n, p in model.named_parameters():
        assert torch.equal(weights[n], p.detach()), n
    torch.cuda.synchronize()
    with pytest.warns(RuntimeWarning, match="noisy gradient holds inf or NaN"):
        one_step()
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_capturable_with_grad_scaler_equals_eager(device):
    """capturable=True and a GradScaler together: the same steps as without capturable."""
    results = []
    for capturable in (False, True):
        model = make_model().to(device)
        opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="cuda", seed=4, capturable=capturable)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)
        torch.manual_seed(9)
        for t in range(4):
            x, y = torch.randn(16, 1, 5, 5, device=device), torch.randint(0, 3, (16,), device=device)
            amp_parts(model, opt, scaler, x, y, poison=(t == 2))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        results.append(({(n, k): v.clone() for n, p in model.named_parameters()
                          for k, v in [("param", p.detach()), *opt.state[p].items()]}, opt.skipped_steps))
    (a, skipped_a), (b, skipped_b) = results
    assert skipped_a == skipped_b == 1
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_cuda_graph_replay_equals_eager(device):
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 5, 5, device=device), torch.randint(0, 3, (16,), device=device)
    eager, graphed = make_model().to(device), make_model().to(device)
    lr = torch.tensor(0.05, device=device)
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
    for i in range(20):
        graph.replay()
        step(eager, opt_e)
        torch.cuda.synchronize()
        for (n, pe), pg in zip(eager.named_parameters(), graphed.parameters()):
            torch.testing.assert_close(pg, pe, rtol=1e-6, atol=1e-7, msg=f"replay {i}: {n}")
            for k in ("momentum", "precision"):
                torch.testing.assert_close(opt_g.state[pg][k], opt_e.state[pe][k], rtol=1e-6, atol=1e-7,
                                           msg=f"replay {i}: {n}.{k}")
    assert opt_g.noise_offset == opt_e.noise_offset == 23   # the counter advanced on the device


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_bf16_autocast_training(device):
    torch.manual_seed(0)
    model = make_model().to(device)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="cuda", seed=2)
    x, y = torch.randn(64, 1, 5, 5, device=device), torch.randint(0, 3, (64,), device=device)
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


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_hundreds_of_small_tensors_match_reference(device):
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 300, (700,), generator=g)]
    results = []
    for backend, dev in (("cuda", device), ("reference", "cpu")):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dev))
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
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu)])
def test_tensor_over_2_pow_31_elements(device):
    n = 2 ** 31 + 4099
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16, device=device))
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
    torch.testing.assert_close(tail.cpu(), (z * 0.5).to(torch.bfloat16).float())


@pytest.mark.parametrize("device", DEVICES)
def test_fsdp2_on_one_rank_equals_the_plain_model(device, tmp_path):
    """bSAM (the device's kernels) on a model sharded by FSDP2's fully_shard over a process
    group of one rank (NCCL on a GPU; gloo on the CPU) takes the steps it takes on the plain
    model: the sharded path (DTensor parameters and state, the group's noise seed) on this
    device. The model, data and steps are test_fsdp's."""
    import datetime

    import torch.distributed as dist
    if not dist.is_available() or (device == "cuda" and not dist.is_nccl_available()):
        pytest.skip("torch.distributed (NCCL on a GPU) not built")
    from torch.distributed.device_mesh import init_device_mesh

    import fsdp_workers as W
    from test_fsdp import state_of
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp_path}/store",
                            rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        # The mesh on this device: fully_shard's default mesh is on the accelerator, if any.
        nets = [make_model(dtype=W.DTYPE).to(device), W.sharded_model(init_device_mesh(device, (1,)))]
        opts = [BSAM(net.parameters(), **W.HYPER, backend=device, seed=7) for net in nets]
        for net, opt in zip(nets, opts):
            for t in range(3):
                x, y = (v.to(device) for v in W.global_batch(t))
                W.one_step(net, opt, [(x, y)], lambda: None)
        want, have = state_of(nets[0], opts[0]), W.full_state(nets[1], opts[1])
        assert want.keys() == have.keys()
        for name, got in have.items():
            assert got.device.type == device
            torch.testing.assert_close(got, want[name], rtol=0, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    finally:
        dist.destroy_process_group()
