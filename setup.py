"""Build bsam-fast. The fused kernels (``bsam_fast._C``) are optional.

The package is pure Python. When torch and a C++ compiler are present, the CPU kernels in
``csrc/`` are built as a torch extension; the CUDA kernels are added when torch is a CUDA
build and nvcc is found (``CUDA_HOME``). Without a compiler the package installs anyway
and runs on the ``foreach`` backend.

Environment:
  BSAM_NO_EXTENSION=1   build nothing (pure Python install; at run time, BSAM_PURE_PYTORCH=1
                        uses the pure-PyTorch backends even where the kernels are built)
  BSAM_NO_CUDA=1        build only the CPU kernels
  BSAM_CPU_ARCH=...     build the CPU kernels once, with -march=... (e.g. native: fastest on the
                        machine that builds, may not run on older processors). Default: on x86-64,
                        one copy per instruction set (baseline, AVX2, AVX-512), chosen at run time
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0")
  MAX_JOBS              parallel compile jobs (ninja)
"""
import os
import platform
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["csrc/ops.cpp", "csrc/cpu/bsam_cpu.cpp", "csrc/python_module.cpp"]
CUDA_SOURCES = ["csrc/cuda/bsam_cuda.cu"]
# The CPU kernels' loops (csrc/cpu/kernels.h), built once per instruction set with ATen's
# names and flags for it; bsam_cpu.cpp picks one at run time as ATen picks its own kernels.
KERNEL_SOURCE = "csrc/cpu/kernels.cpp"
X86_KERNEL_VARIANTS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mprefer-vector-width=512"],
}
# GCC only (clang refuses them): GCC's default tuning splits unaligned 256-bit loads and
# stores, which costs on today's processors (ATen adds the same flags).
GCC_AVX2_FLAGS = ["-mno-avx256-split-unaligned-load", "-mno-avx256-split-unaligned-store"]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _cxx() -> str:
    return (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()[0]


def _have_cxx() -> bool:
    return shutil.which(_cxx()) is not None


def _cxx_is_gcc() -> bool:
    import subprocess
    try:
        out = subprocess.run([_cxx(), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return "clang" not in out.lower() and ("gcc" in out.lower() or "g++" in out.lower() or "free software" in out.lower())


def _pip_cuda_headers_missing_from(cuda_home, torch):
    """The include folder of torch's pip CUDA packages (site-packages/nvidia/cu13/include)
    if CUDA_HOME lacks headers that it has (a toolkit with nvcc but without cuBLAS or
    cuSPARSE headers, as on CI); else None, so that CUDA_HOME's headers, which match its
    nvcc, are the only ones used."""
    include = os.path.abspath(os.path.join(os.path.dirname(torch.__file__), os.pardir, "nvidia",
                                           "cu13", "include"))
    if not os.path.isdir(include):
        return None
    own = os.path.join(cuda_home, "include")
    needed = ("cublas_v2.h", "cusparse.h", "cusolverDn.h", "curand.h", "cufft.h")
    missing = [h for h in needed
               if os.path.exists(os.path.join(include, h)) and not os.path.exists(os.path.join(own, h))]
    if not missing:
        return None
    print(f"bsam-fast: {own} lacks {', '.join(missing)}; using {include} after it",
          file=sys.stderr)
    return include


def _nvcc_supports_large_kernel_arguments(cuda_home) -> bool:
    """The kernels take their tensor lists as one ~23 KB argument, which needs CUDA >= 12.1
    (the limit was 4 KB before). With an older nvcc, build the CPU kernels only."""
    import re
    import subprocess
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return True                      # let the build itself say what is wrong
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found and (int(found.group(1)), int(found.group(2))) < (12, 1):
        print(f"bsam-fast: nvcc {found.group(1)}.{found.group(2)} is older than 12.1 (kernel arguments "
              "over 4 KB); building the CPU kernels only", file=sys.stderr)
        return False
    return True


def _extensions():
    if os.environ.get("BSAM_NO_EXTENSION") == "1":
        print("bsam-fast: BSAM_NO_EXTENSION=1, building no kernels", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # pip's default build isolation hides the torch you have (and pyproject.toml does
        # not ask for one: that would build against another torch than the one the
        # extension loads into). Stop now, saying what works.
        raise SystemExit("bsam-fast: torch is not importable here, so the kernels cannot be built "
                         "against your torch. Install torch first, then build without isolation:\n"
                         "    pip install --no-build-isolation .\n"
                         "(or BSAM_NO_EXTENSION=1 pip install . for the pure-PyTorch backends only)")
    if not _have_cxx():
        print("bsam-fast: no C++ compiler found; building no kernels", file=sys.stderr)
        return [], {}
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    sources = [s for s in CPU_SOURCES]
    # Recorded in the extension: on import, a torch of another version falls back with a
    # message (bsam_fast/_ops.py) rather than loading kernels built for another ABI.
    define_macros = [("BSAM_TORCH_VERSION", '"' + torch.__version__ + '"')]
    arch = os.environ.get("BSAM_CPU_ARCH")
    if arch:
        variants = {"DEFAULT": [f"-march={arch}"] + (["-mprefer-vector-width=512"] if X86 else [])}
        define_macros.append(("BSAM_CPU_KERNELS_NAME", f'"march={arch}"'))
        cxx_flags += [f"-march={arch}"]
    elif X86:
        variants = dict(X86_KERNEL_VARIANTS)
        if _cxx_is_gcc():
            variants["AVX2"] = variants["AVX2"] + GCC_AVX2_FLAGS
        define_macros.append(("BSAM_CPU_DISPATCH", "1"))
    else:
        variants = {"DEFAULT": []}
    extra = {"cxx": cxx_flags}
    want_cuda = (os.environ.get("BSAM_NO_CUDA") != "1" and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None
                 and all(os.path.exists(os.path.join(HERE, s)) for s in CUDA_SOURCES)
                 and _nvcc_supports_large_kernel_arguments(cpp_extension.CUDA_HOME))
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += CUDA_SOURCES
        define_macros.append(("BSAM_WITH_CUDA", "1"))
        # --fmad=false: one rounding per operation, as on the CPU (bsam_math.h).
        nvcc = ["-O3", "--fmad=false", "-lineinfo"]
        pip_include = _pip_cuda_headers_missing_from(cpp_extension.CUDA_HOME, torch)
        if pip_include:
            # -isystem: searched after every -I, so CUDA_HOME's own headers always win.
            nvcc += ["-isystem", pip_include]
        extra["nvcc"] = nvcc
        ext_cls = cpp_extension.CUDAExtension
        print(f"bsam-fast: building CPU and CUDA kernels (CUDA_HOME={cpp_extension.CUDA_HOME}, "
              f"arch {os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
    else:
        ext_cls = cpp_extension.CppExtension
        print("bsam-fast: building CPU kernels", file=sys.stderr)
    ext = ext_cls("bsam_fast._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
                  define_macros=define_macros, include_dirs=[os.path.join(HERE, "csrc")],
                  depends=[KERNEL_SOURCE, "csrc/cpu/kernels.h", "csrc/bsam_math.h", "csrc/checks.h"])
    build_ext = _build_ext_with_kernel_variants(cpp_extension.BuildExtension, variants)
    return [ext], {"build_ext": build_ext.with_options(no_python_abi_suffix=False)}


def _build_ext_with_kernel_variants(base, variants):
    """torch's BuildExtension, which also compiles KERNEL_SOURCE once per entry of
    `variants` ({CPU_CAPABILITY: extra flags}) into its own folder and links the objects in.
    The compiler call is torch's own (same flags, ninja or not), so every copy is built as
    the rest of the extension is."""

    class BuildExtensionWithKernelVariants(base):
        def build_extension(self, ext):
            objects = []
            for capability, flags in variants.items():
                extra = dict(ext.extra_compile_args)
                extra["cxx"] = list(extra["cxx"]) + [f"-DCPU_CAPABILITY={capability}",
                                                     f"-DCPU_CAPABILITY_{capability}"] + flags
                objects += self.compiler.compile(
                    [KERNEL_SOURCE], output_dir=os.path.join(self.build_temp, "kernels", capability),
                    macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs=extra, depends=ext.depends)
            ext.extra_objects = [o for o in (ext.extra_objects or []) if o not in objects] + objects
            super().build_extension(ext)

    return BuildExtensionWithKernelVariants


def _wheel_build_outside_the_tree():
    """pip builds a wheel (`pip install .`, `pip wheel .`) in the source folder, where
    setuptools would leave build/ and bsam_fast.egg-info behind: put both in a temporary
    folder, removed at exit. Other commands (build_ext --inplace, editable installs) keep
    setuptools' defaults."""
    if "bdist_wheel" not in sys.argv[1:]:
        return {}
    import atexit
    import tempfile
    scratch = tempfile.mkdtemp(prefix="bsam-fast-build-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return {"build": {"build_base": os.path.join(scratch, "build")}, "egg_info": {"egg_base": scratch}}


ext_modules, cmdclass = _extensions()
setup(packages=find_packages(include=["bsam_fast", "bsam_fast.*"]),
      package_data={"bsam_fast.experiments": ["*.json"]},     # the demo's tuned hyperparameters
      ext_modules=ext_modules, cmdclass=cmdclass, options=_wheel_build_outside_the_tree())
