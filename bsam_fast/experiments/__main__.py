"""``python -m bsam_fast.experiments ...``: the experiment commands of ``run.py``."""
from .run import main

main()
