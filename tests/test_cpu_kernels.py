"""The compiled CPU kernels: op contracts, input checks, exactness against the reference."""
import subprocess
import sys

import pytest
import torch

from bsam_fast import BSAM, _ops
from bsam_fast.noise import noise_bases, normal_like
from bsam_fast.backends import reference as ref
from helpers import make_model, train

pytestmark = pytest.mark.skipif(not _ops.has_kernel("cpu"), reason="CPU kernels not built")
ops = torch.ops.bsam_fast
SHAPES = [(33, 17), (5,), (1,), (4, 3, 3, 3), (70000,)]


def tensors(dtype=torch.float32, positive=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    return [t.abs() + 0.5 for t in out] if positive else out


def state(dtype):
    op = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return dict(params=tensors(dtype, seed=1), means=tensors(op, seed=2),
                precisions=tensors(op, positive=True, seed=3), u=tensors(op, positive=True, seed=4),
                grads=tensors(dtype, seed=5), momenta=tensors(op, seed=6),
                bases=noise_bases([torch.Size(s).numel() for s in SHAPES]))


def flag():
    return torch.zeros(1)


# ------------------------------------------------------------------ op contracts
def test_opcheck_every_op():
    st = state(torch.float32)
    cases = {
        "sample_": (st["params"], st["means"], st["precisions"], st["bases"], 100.0, 7, 3, True, None),
        "perturb_": (st["params"], st["grads"], st["means"], st["precisions"], st["u"], 0.05,
                     torch.tensor([0.5]), False, flag()),
        "check_finite_": (st["grads"], flag()),
        "update_": (st["params"], st["means"], st["momenta"], st["precisions"], st["grads"], st["u"],
                    None, 0.5, 1.0, 0.01, 0.9, 0.999, 1e-3, 0.1, True),
        "normal_": ([torch.empty(s) for s in SHAPES], st["bases"], 7, 3),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.__setitem__("means", a["means"][:-1]), "means must have one tensor per parameter"),
    (lambda a: a["precisions"].__setitem__(0, a["precisions"][0].double()), r"precisions\[0\] must have dtype Float"),
    (lambda a: a["means"].__setitem__(1, torch.zeros(6)), r"means\[1\] must have shape \[5\]"),
    (lambda a: a["params"].__setitem__(0, torch.zeros(17, 33).t()), r"params\[0\] must be contiguous"),
    (lambda a: a.__setitem__("bases", [0, 2, 4, 8, 12]), r"bases\[1\] must be a non-negative multiple of 4"),
    (lambda a: a["params"].__setitem__(2, torch.zeros(1, dtype=torch.float64)), r"params\[2\] must have dtype Float"),
])
def test_sample_checks_its_inputs(mutate, match):
    st = state(torch.float32)
    args = dict(params=list(st["params"]), means=list(st["means"]),
                precisions=list(st["precisions"]), bases=st["bases"])
    mutate(args)
    before = [p.clone() for p in args["params"]]
    with pytest.raises(RuntimeError, match=match):
        ops.sample_(args["params"], args["means"], args["precisions"], args["bases"], 10.0, 1, 0, False, None)
    for p, b in zip(args["params"], before):
        assert torch.equal(p, b)                      # nothing written before the checks


def test_integer_params_and_bad_found_inf_are_refused():
    st = state(torch.float32)
    with pytest.raises(RuntimeError, match="tensors must be float32, float64, float16 or bfloat16"):
        ops.check_finite_([torch.zeros(3, dtype=torch.int32)], flag())
    with pytest.raises(RuntimeError, match="found_inf must be a one-element float32"):
        ops.check_finite_(st["grads"], torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have dtype Float"):
        ops.update_(st["params"], st["means"], st["momenta"], st["precisions"],
                    [g.double() for g in st["grads"]], st["u"], None, 1.0, 1.0, 0.1, 0.9, 0.99, 0.0, 0.1, False)


# ------------------------------------------------------------------ exactness vs the reference
def to_op(t, like):
    return t.to(like.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_phases_match_reference_elementwise(dtype):
    """Each phase, given the same inputs, equals the reference formula: fp32 within 1e-6
    relative (torch's own sqrt may be 1 ulp off on CPU; the kernels' is IEEE), fp64 1e-13."""
    st = state(dtype)
    tol = {torch.float32: (1e-6, 1e-7), torch.float64: (1e-13, 1e-15)}.get(dtype)
    check = (lambda a, b: torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1])) if tol else \
        (lambda a, b: torch.testing.assert_close(a, b))
    # sample (stream noise, loading the mean from the parameters)
    params = [p.clone() for p in st["params"]]
    means = [torch.empty_like(m) for m in st["means"]]
    ops.sample_(params, means, st["precisions"], st["bases"], 250.0, 11, 4, True, None)
    xi = normal_like(params, st["bases"], 11, 4, dtype=st["means"][0].dtype)
    for p, p0, w, s, z in zip(params, st["params"], means, st["precisions"], xi):
        check(w, p0.to(w.dtype))
        check(p, ref.noisy_point(p0.to(w.dtype), s, z, 250.0).to(dtype))
    # perturb (not the first part, with a GradScaler's inverse scale)
    params = [p.clone() for p in st["params"]]
    grads = [g.clone() for g in st["grads"]]
    u = [x.clone() for x in st["u"]]
    found = flag()
    ops.perturb_(params, grads, st["means"], st["precisions"], u, 0.07, torch.tensor([0.25]), False, found)
    assert found.item() == 0
    for p, g0, g, w, s, u0, u1 in zip(params, st["grads"], grads, st["means"], st["precisions"], st["u"], u):
        gg = g0.to(w.dtype) * torch.tensor([0.25])
        check(u1, u0 + ref.gradient_magnitude(s, gg))
        check(p, ref.perturbed_point(w, s, gg, 0.07).to(dtype))
        assert torch.equal(g, g0)                  # gradients are read, never written
    # update (mean written back, as for bf16/fp16 master copies)
    params = [p.clone() for p in st["params"]]
    means = [m.clone() for m in st["means"]]
    momenta = [m.clone() for m in st["momenta"]]
    precisions = [s.clone() for s in st["precisions"]]
    _ops.update_(params, means, momenta, precisions, st["grads"], st["u"], 0.5, 0.5, 0.03,
                 0.9, 0.99, 1e-3, 0.1, True)
    for i in range(len(SHAPES)):
        w, gm, s = st["means"][i], st["momenta"][i], st["precisions"][i]
        g = st["grads"][i].to(w.dtype) * 0.5
        gm_new = ref.momentum_update(gm, g, w, 0.9, 1e-3)
        w_new = ref.mean_update(w, gm_new, s, 0.03)
        check(momenta[i], gm_new)
        check(means[i], w_new)
        check(precisions[i], ref.precision_update(s, st["u"][i] * 0.5, 0.99, 0.1, 1e-3))
        check(params[i], w_new.to(dtype))


def test_non_finite_is_flagged_by_every_checking_op():
    st = state(torch.float32)
    st["grads"][3].view(-1)[17] = float("nan")
    for run in (lambda f: ops.check_finite_(st["grads"], f),
                lambda f: ops.perturb_([p.clone() for p in st["params"]], [g.clone() for g in st["grads"]],
                                       st["means"], st["precisions"], [u.clone() for u in st["u"]], 0.1, None, True, f)):
        f = flag()
        run(f)
        assert f.item() == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_an_fp32_master(dtype):
    model = make_model(dtype=dtype)
    opt = BSAM(model.parameters(), lr=0.05, num_data=100, backend="cpu", seed=3)
    train(model, opt, 3, dtype=dtype)
    for p in model.parameters():
        st = opt.state[p]
        assert st["mean"].dtype == st["momentum"].dtype == st["precision"].dtype == torch.float32
        assert torch.equal(p.detach(), st["mean"].to(dtype))   # the parameter is the rounded master


def test_result_does_not_depend_on_thread_count():
    """The kernels give the same bits on 1 and 2 threads (the model's own forward and
    backward are left out: torch's reductions may depend on the thread count)."""
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            st = state(torch.float32)
            ops.sample_(st["params"], st["means"], st["precisions"], st["bases"], 50.0, 9, 1, True, None)
            ops.perturb_(st["params"], st["grads"], st["means"], st["precisions"], st["u"], 0.1, None,
                         True, flag())
            ops.update_(st["params"], st["means"], st["momenta"], st["precisions"], tensors(seed=8),
                        st["u"], None, 1.0, 1.0, 0.05, 0.9, 0.999, 1e-3, 0.1, False)
            results.append(st)
    finally:
        torch.set_num_threads(old)
    for key in ("params", "momenta", "precisions", "u"):
        for a, b in zip(results[0][key], results[1][key]):
            assert torch.equal(a, b), key


def test_package_works_without_the_extension():
    code = ("import sys, warnings; sys.modules['bsam_fast._C'] = None\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import bsam_fast, torch\n"
            "    from bsam_fast import BSAM\n"
            "    p = torch.nn.Parameter(torch.ones(3))\n"
            "    opt = BSAM([p], lr=0.1, num_data=10)\n"
            "    BSAM([p], lr=0.1, num_data=10)\n"
            "msgs = [str(x.message) for x in w if 'compiled kernels not available' in str(x.message)]\n"
            "print(opt.backend, len(msgs), bsam_fast.available_backends())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == ["foreach", "1"], out.stdout + out.stderr
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-c", "import sys; sys.modules['bsam_fast._C'] = None\n"
                        "import torch, bsam_fast\nbsam_fast.BSAM([torch.nn.Parameter(torch.ones(2))], "
                        "lr=0.1, num_data=1, backend='cpu')"], check=True, capture_output=True)


# The ops once on every instruction set: each dtype, each flag of each op, odd sizes and one
# over a chunk. Runs in a subprocess per set (ATen reads ATEN_CPU_CAPABILITY once).
_ALL_OPS_SCRIPT = r"""
import sys, numpy, torch
from bsam_fast import _C
ops = torch.ops.bsam_fast
sizes = [1, 5, 17, 255, 70001]
bases = [0]
for n in sizes[:-1]:
    bases.append(bases[-1] + (n + 3) // 4 * 4)
rng = numpy.random.default_rng(0)   # not torch's generators: they draw differently per set
def make(dtype, positive=False):
    return [torch.from_numpy(rng.random(n) + 0.5 if positive else rng.standard_normal(n)).to(dtype)
            for n in sizes]
out = {"kernels": _C.cpu_kernels, "aten": torch.backends.cpu.get_cpu_capability()}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    op = torch.float64 if dtype == torch.float64 else torch.float32
    p, w, s, u, gm = make(dtype), make(op), make(op, True), make(op, True), make(op)
    grads, noise, flag = make(dtype), make(op), torch.zeros(1)
    for load_mean in (True, False):
        ops.sample_(p, w, s, bases, 60000.0, 12345, 3, load_mean, None)
    ops.sample_(p, w, s, bases, 600.0, 1, 0, False, noise)
    for first in (True, False):
        ops.perturb_(p, grads, w, s, u, 0.05, torch.tensor([0.5]), first, flag)
    for write_mean in (False, True):
        ops.update_(p, w, gm, s, grads, u, None, 0.5, 0.5, 0.1, 0.9, 0.999, 1e-3, 0.1, write_mean)
    grads[-1][70000] = float("nan")
    ops.check_finite_(grads, flag)
    out[str(dtype)] = dict(p=p, w=w, s=s, u=u, gm=gm, flag=flag)
z = [torch.empty(n) for n in sizes]
ops.normal_(z, bases, 7, 2)
out["normal"] = z
torch.save(out, sys.argv[1])
"""


def test_every_instruction_set_gives_the_same_bits(tmp_path):
    """The kernels are built once per instruction set (kernels.h) and chosen at run time:
    the choice follows ATen's (ATEN_CPU_CAPABILITY), and every copy gives the same bits."""
    import os
    import platform
    order = ["DEFAULT", "AVX2", "AVX512"]

    def named(aten: str) -> str:          # older torch names the x86-64 baseline "NO AVX"
        return "DEFAULT" if aten == "NO AVX" else aten
    native = named(torch.backends.cpu.get_cpu_capability())
    results = {}
    for capability in order[:order.index(native) + 1] if native in order else ["DEFAULT"]:
        path = tmp_path / f"{capability}.pt"
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        env["ATEN_CPU_CAPABILITY"] = capability.lower()
        subprocess.run([sys.executable, "-c", _ALL_OPS_SCRIPT, str(path)], env=env, check=True)
        out = torch.load(path)
        aten, kernels = named(out["aten"]), out["kernels"]
        del out["aten"], out["kernels"]
        if not kernels.startswith("march=") and platform.machine().lower() in ("x86_64", "amd64"):
            assert kernels == aten == capability, f"asked for {capability}: ATen runs {aten}, the kernels {kernels}"
        results[kernels] = out
    if len(results) < 2:
        pytest.skip(f"only one set of kernels runs here: {list(results)}")
    first, *others = results
    for other in others:
        a, b = results[first], results[other]
        for key in a:
            if key == "normal":
                pairs = [("normal", x, y) for x, y in zip(a[key], b[key])]
            else:
                pairs = [(f"{key} {name}", x, y) for name in a[key]
                         for x, y in zip(*(([a[key][name]], [b[key][name]]) if name == "flag"
                                           else (a[key][name], b[key][name])))]
            for what, x, y in pairs:
                assert torch.equal(x, y), f"{first} and {other} differ in {what}"
        assert all(bool(results[k]["torch.float32"]["flag"]) for k in results)
