"""The research harness: offline data sets, models, the SAM baselines, one training loop,
and the experiment commands (``python -m bsam_fast.experiments ...``, see ``run.py``).

Not part of the optimizer: it uses ``bsam_fast`` as any user would.
"""
from .run import main

__all__ = ["main"]
