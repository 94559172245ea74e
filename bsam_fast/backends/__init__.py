"""The backends: the code that touches tensors, one implementation of the phases per file.

``base.py`` defines the interface (and the ``Bucket`` a phase works on); ``reference.py``
is the oracle, a line-by-line transcription of the update; ``foreach.py`` the same math as
multi-tensor ``torch._foreach_*`` ops; ``fused.py`` the compiled kernels (``cpu``,
``cuda``), which report themselves unavailable when the extension did not load.

This module is the registry: the backends it knows, fastest first, and the choice made by
``backend="auto"`` (the first available backend that supports every parameter).
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from .. import _ops
from .base import Backend
from .foreach import ForeachBackend
from .fused import CpuBackend, CudaBackend
from .reference import ReferenceBackend

# name -> class, fastest first.
_REGISTRY: dict[str, type[Backend]] = {cls.name: cls for cls in sorted(
    (CudaBackend, CpuBackend, ForeachBackend, ReferenceBackend), key=lambda c: -c.priority)}


def backend_names() -> list[str]:
    """Every backend name this build knows, available or not, plus "auto"."""
    return ["auto", *_REGISTRY]


def available_backends() -> list[str]:
    """Names of the backends that can run here, fastest first."""
    return [n for n, cls in _REGISTRY.items() if cls.is_available()]


def make_backend(name: str, params: Iterable[Tensor]) -> Backend:
    """Instantiate backend `name` ("auto": the fastest that supports all `params`)."""
    params = list(params)
    _ops.warn_once_unavailable()     # says so once if the compiled kernels did not load
    if name == "auto":
        for cls in _REGISTRY.values():
            if cls.is_available():
                backend = cls()
                if all(backend.supports(p) is None for p in params):
                    return backend
        raise RuntimeError("no bSAM backend supports these parameters")  # foreach supports all
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {backend_names()}")
    cls = _REGISTRY[name]
    if not cls.is_available():
        raise ValueError(f"backend {name!r} is not available in this build: "
                         f"{getattr(cls, 'unavailable_reason', lambda: '')()}")
    backend = cls()
    for p in params:
        reason = backend.supports(p)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot handle a parameter: {reason}")
    return backend
