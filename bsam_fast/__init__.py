"""bsam-fast: Bayesian-SAM (Möllenhoff & Khan, ICLR 2023) as a fast torch optimizer."""
from .backends import available_backends, backend_names
from .optimizer import BSAM
from .parts import split_batch

__all__ = ["BSAM", "split_batch", "available_backends", "backend_names"]
__version__ = "0.1.0"
