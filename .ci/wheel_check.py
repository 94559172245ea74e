"""The installed wheel, as a user gets it: run from outside the source tree, in a virtualenv
holding only torch, numpy and the wheel. The kernels load and a bSAM step of the compiled
`cpu` backend equals the pure-PyTorch reference's. The wheel is portable: its CPU kernels
are the copy for the instruction set ATen chose on this processor."""
import os

import torch

import bsam_fast
from bsam_fast import BSAM, _ops

assert "site-packages" in bsam_fast.__file__, f"not the installed package: {bsam_fast.__file__}"
assert _ops.is_loaded(), _ops.LOAD_ERROR
assert "cpu" in bsam_fast.available_backends(), bsam_fast.available_backends()
if os.uname().machine == "x86_64":
    aten = {"NO AVX": "DEFAULT"}.get(torch.backends.cpu.get_cpu_capability(), torch.backends.cpu.get_cpu_capability())
    assert _ops.cpu_kernels() == aten, (_ops.cpu_kernels(), aten)
x, y = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3
results = {}
for backend in ("cpu", "reference"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = BSAM(model.parameters(), lr=0.05, num_data=64, backend=backend, seed=0)
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    results[backend] = torch.cat([p.detach().flatten() for p in model.parameters()])
diff = (results["cpu"] - results["reference"]).abs().max().item()
assert diff < 1e-5, diff
print(f"wheel: bsam_fast {bsam_fast.__version__} from {os.path.dirname(bsam_fast.__file__)}, torch "
      f"{torch.__version__}, {_ops.cpu_kernels()} kernels loaded; 3 steps equal the reference to {diff:.1e}")
