"""Finished runs on disk, so that long experiments survive restarts and span machines.

Every training run of ``tune`` and ``table`` is described by a *spec*: a JSON-able dict of
everything that determines its result (command, data set, model, method, hyperparameters,
budget, seed, ...). When a run ends, its record is written to ``<folder>/<key>.json``,
atomically (a temporary file renamed), where the key is a hash of the spec. Restarted with
the same arguments, a command finds the records of the runs that had finished and runs only
the others; a run interrupted halfway left nothing and starts again from scratch.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Optional


def spec_key(spec: dict) -> str:
    """A stable name for a run: its method and a hash of its whole spec."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return f"{spec.get('method', 'run')}-{hashlib.sha1(text.encode()).hexdigest()[:16]}"


class RunStore:
    """The finished runs in one folder, one JSON file per run."""

    def __init__(self, folder: str):
        self.folder = folder

    def _path(self, spec: dict) -> str:
        return os.path.join(self.folder, spec_key(spec) + ".json")

    def get(self, spec: dict) -> Optional[dict]:
        """The record of the finished run with this spec, or None."""
        try:
            with open(self._path(spec)) as f:
                saved = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return saved["record"] if saved.get("spec") == spec else None

    def put(self, spec: dict, record: dict) -> None:
        os.makedirs(self.folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"spec": spec, "record": record}, f, indent=1)
        os.replace(tmp, self._path(spec))

    def run(self, spec: dict, compute) -> tuple[dict, bool]:
        """(record, True) from disk if this run finished before, else (compute(), False),
        stored before it is returned."""
        record = self.get(spec)
        if record is not None:
            return record, True
        record = compute()
        self.put(spec, record)
        return record, False
