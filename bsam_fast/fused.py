"""Compiled backends (``cpu``, ``cuda``) from the ``bsam_fast._C`` extension, when built."""
