"""Installing and loading like a PyTorch extension: a build that cannot use your torch stops
at once saying what works; kernels that cannot be used fall back with a message naming
why and the rebuild command; a switch forces the pure-PyTorch backends; optional parts name
the extra that installs them."""
import os
import pathlib
import subprocess
import sys

import pytest

from bsam_fast import _ops

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=str(ROOT), timeout=300)


def test_the_pure_pytorch_switch_uses_foreach_without_a_warning():
    out = _python("import torch, bsam_fast; from bsam_fast import BSAM\n"
                  "print(bsam_fast.available_backends(), "
                  "BSAM([torch.nn.Parameter(torch.ones(2))], lr=0.1, num_data=1).backend)",
                  BSAM_PURE_PYTORCH="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['foreach', 'reference'] foreach"
    assert "compiled kernels" not in out.stderr


@pytest.mark.skipif(not _ops.is_loaded(), reason="the extension is not built")
def test_the_extension_records_the_torch_it_was_built_for():
    import torch
    from bsam_fast import _C
    assert _C.torch_version == torch.__version__


def test_kernels_built_for_another_torch_fall_back_naming_both_versions():
    """The check _ops runs at import, with a module that claims another torch version."""
    out = _python("import importlib.machinery, sys, types, torch\n"
                  "fake = types.ModuleType('bsam_fast._C'); fake.torch_version = '1.0.0'\n"
                  "fake.__spec__ = importlib.machinery.ModuleSpec('bsam_fast._C', None)\n"
                  "sys.modules['bsam_fast._C'] = fake\n"
                  "import bsam_fast\nfrom bsam_fast import _ops\nprint(_ops.LOAD_ERROR)\n"
                  "p = torch.nn.Parameter(torch.ones(2)); opt = bsam_fast.BSAM([p], lr=0.1, num_data=1)\n"
                  "print(opt.backend)")
    assert out.returncode == 0, out.stderr
    assert "built for torch 1.0.0" in out.stdout and "pip install --no-build-isolation ." in out.stdout
    assert out.stdout.strip().endswith("foreach")
    assert "compiled kernels not available" in out.stderr and "<string>" in out.stderr   # the user's line


def test_a_build_without_torch_stops_naming_no_build_isolation(tmp_path):
    """What pip's isolated build environment looks like to setup.py: no torch."""
    code = ("import builtins, runpy, sys\n"
            "real = builtins.__import__\n"
            "def no_torch(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'):\n"
            "        raise ImportError('No module named torch')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = no_torch\n"
            "sys.argv = ['setup.py', '--version']\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    out = _python(code)
    assert out.returncode != 0
    assert "pip install --no-build-isolation ." in out.stderr + out.stdout


def test_optional_parts_name_their_extra(monkeypatch):
    from bsam_fast.integrations import require
    with pytest.raises(ImportError, match=r"bsam-fast\[lightning\]"):
        require("a_module_that_is_not_there", "lightning")
