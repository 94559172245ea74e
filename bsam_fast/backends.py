"""Registry of backends and the choice made by ``backend="auto"``."""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from ._backend import Backend
from .foreach import ForeachBackend
from .reference import ReferenceBackend

# name -> class; listed fastest first (highest `priority`): "auto" takes the first
# available backend that supports every parameter.
_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls
    ordered = sorted(_REGISTRY.values(), key=lambda c: -getattr(c, "priority", 0))
    _REGISTRY.clear()
    _REGISTRY.update((c.name, c) for c in ordered)
    return cls


register_backend(ForeachBackend)
register_backend(ReferenceBackend)


def _register_fused() -> None:
    # Imported for its side effect: registers "cpu" (and "cuda") ahead of "foreach"
    # when the compiled extension loads; otherwise leaves the registry as is.
    from . import fused  # noqa: F401


def backend_names() -> list[str]:
    """Every backend name this build knows, available or not, plus "auto"."""
    _register_fused()
    return ["auto", *_REGISTRY]


def available_backends() -> list[str]:
    """Names of the backends that can run here, fastest first."""
    _register_fused()
    return [n for n, cls in _REGISTRY.items() if cls.is_available()]


def make_backend(name: str, params: Iterable[Tensor]) -> Backend:
    """Instantiate backend `name` ("auto": the fastest that supports all `params`)."""
    _register_fused()
    params = list(params)
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
