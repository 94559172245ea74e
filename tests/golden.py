"""Replay of a golden trajectory file (format: shared/golden/README.md)."""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from bsam_fast import BSAM, split_batch

PARAM_NAMES = ("W1", "b1", "W2", "b2")


def max_relative_deviation(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got - ref| / max|ref| over one tensor (ref never all-zero here)."""
    ref = ref.double()
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def replay(path, backend: str, dtype: torch.dtype, device: str = "cpu"):
    """Yield (step, {'w'|'gm'|'s': worst deviation over the parameters}, loss, golden loss)."""
    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    params = [torch.tensor(data[f"init/{n}"], dtype=dtype, device=device, requires_grad=True)
              for n in PARAM_NAMES]
    opt = BSAM(params, lr=meta["lr"], num_data=meta["ndata"], rho=meta["rho"],
               betas=(meta["beta1"], meta["beta2"]), weight_decay=meta["wdecay"],
               damping=meta["damping"], s_init=meta["s_init"], backend=backend)
    W1, b1, W2, b2 = params
    m = int(meta["m"])
    steps = int(data["X"].shape[0])
    for t in range(steps):
        opt.param_groups[0]["lr"] = meta["lr"] * float(data["lrfactor"][t])
        parts = split_batch(torch.tensor(data["X"][t], dtype=dtype, device=device),
                            torch.tensor(data["labels"][t], device=device), m=m)

        def closure(k):
            opt.zero_grad()
            x, y = parts[k]
            loss = F.cross_entropy(torch.tanh(x @ W1 + b1) @ W2 + b2, y)
            loss.backward()
            return loss

        noise = [[torch.tensor(data[f"step{t}/noise{k}/{n}"], dtype=dtype, device=device) for n in PARAM_NAMES]
                 for k in range(m)]
        loss = opt.step_parts(closure, m, noise=noise)
        worst = {}
        for key, value in (("w", lambda p: p.detach()),
                           ("gm", lambda p: opt.state[p]["momentum"]),
                           ("s", lambda p: opt.state[p]["precision"])):
            worst[key] = max(max_relative_deviation(value(p).cpu(),
                                                    torch.from_numpy(data[f"step{t}/{key}/{n}"]))
                             for n, p in zip(PARAM_NAMES, params))
        yield t, worst, float(loss), float(data[f"step{t}/loss"])
