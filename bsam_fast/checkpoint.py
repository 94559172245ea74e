"""BSAM's checkpoints: what ``state_dict()`` adds to torch.optim's, and how
``load_state_dict`` reads it back.

A BSAM state_dict is torch.optim's plus the noise stream's position and the skipped
steps: at the top level (``"noise"``, ``"skipped_steps"``) and, for checkpoint tools that
keep only ``state`` and ``param_groups`` (``torch.distributed.checkpoint.state_dict``), in
the first param group (``"bsam_stream"``). A parameter's state also says whether it is
still the initial one (``"unstepped"``: made again at the first step). The state of an
FSDP2 parameter is handed out as a DTensor laid out like it (sharing the optimizer's
storage) and read back as this rank's local shard.
"""
from __future__ import annotations

from torch import Tensor

from . import distributed, sharded
from ._checks import check_state_dict
from .backends.base import opmath_dtype
from .tensor_state import init_state

STREAM_KEY = "bsam_stream"
UNSTEPPED_KEY = "unstepped"


def add_stream_and_states(state_dict: dict, params: list[Tensor], seed: int, offset: int, skipped: int,
                          unstepped: set) -> dict:
    """The state_dict post-hook's work (see the module docstring)."""
    stream = {"seed": seed, "offset": offset}
    state_dict["noise"] = dict(stream)
    state_dict["skipped_steps"] = skipped
    if state_dict["param_groups"]:
        state_dict["param_groups"][0][STREAM_KEY] = dict(stream, skipped_steps=skipped)
    for i, p in enumerate(params):
        if i not in state_dict["state"]:
            continue
        st = {k: sharded.as_dtensor_like(v, p) if sharded.is_sharded(p) and isinstance(v, Tensor) else v
              for k, v in state_dict["state"][i].items()}     # a new dict: the optimizer's stays
        st[UNSTEPPED_KEY] = p in unstepped        # the initial state: re-read at its first step
        state_dict["state"][i] = st
    return state_dict


def normalised(state_dict: dict, params: list[Tensor]) -> dict:
    """A state_dict as ``load_state_dict`` reads it: the stream's position at the top level
    (also when only the copy in the first param group came through), no copy left in the
    groups, and the state of FSDP2 parameters as this rank's local shards."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
        return state_dict                                  # check_state_dict names it
    out = dict(state_dict)
    stream = next((g[STREAM_KEY] for g in groups if isinstance(g, dict) and STREAM_KEY in g), None)
    if stream is not None:
        out.setdefault("noise", {"seed": stream.get("seed"), "offset": stream.get("offset")})
        out.setdefault("skipped_steps", stream.get("skipped_steps", 0))
    out["param_groups"] = [{k: v for k, v in g.items() if k != STREAM_KEY} if isinstance(g, dict) else g
                           for g in groups]
    saved_ids = [i for g in out["param_groups"] if isinstance(g, dict) for i in g.get("params", [])]
    if any(sharded.is_sharded(p) for p in params) or any(
            sharded.is_sharded(v) for st in state_dict["state"].values() if isinstance(st, dict)
            for v in st.values()):
        out["state"] = {i: ({k: sharded.local_like(v, p) if isinstance(v, Tensor) else v
                             for k, v in state_dict["state"][i].items()}
                            if isinstance(state_dict["state"].get(i), dict) else state_dict["state"].get(i))
                        for i, p in zip(saved_ids, params) if i in state_dict["state"]}
    return out


def checked(state_dict: dict, params: list[Tensor], shard_group) -> dict:
    """The state_dict normalised and checked before anything is loaded (a refused load
    changes nothing); under FSDP2 every rank checks its shards and all load, or none."""
    refused = None
    try:
        state_dict = normalised(state_dict, params)
        check_state_dict(state_dict, params)
    except ValueError as exc:
        refused = exc
    if shard_group is not None:
        if not distributed.all_agree(shard_group, refused is None, sharded.local(params[0]).device):
            raise refused or ValueError("another rank refused its shard of this state_dict; "
                                        "nothing was loaded")
    if refused is not None:
        raise refused
    return state_dict


def saved_states(state_dict: dict) -> dict:
    """{saved index: a copy of its state dict}, taken before torch.optim's load, which casts
    floating state to the parameter's dtype (rounding the fp32 state of bf16/fp16
    parameters): BSAM loads the state itself afterwards (``restore_states``)."""
    return {i: dict(state_dict["state"].get(i, {})) for g in state_dict["param_groups"] for i in g["params"]}


def restore_states(saved: dict, param_groups: list[dict], state, unstepped: set) -> None:
    """After torch.optim's load: each parameter's saved state, as copies on its device in its
    opmath dtype; parameters with none saved start as new."""
    params = [p for g in param_groups for p in g["params"]]
    for i, p in zip(saved, params):
        st = dict(saved[i])
        state.pop(p, None)
        unstepped.discard(p)
        was_unstepped = st.pop(UNSTEPPED_KEY, False)
        if st:
            dtype = opmath_dtype(p.dtype)
            state[p] = {k: (v.to(device=p.device, dtype=dtype, copy=True) if isinstance(v, Tensor) else v)
                        for k, v in st.items()}
            if was_unstepped:
                unstepped.add(p)
    for g in param_groups:
        g["betas"] = tuple(g["betas"])
        for p in g["params"]:
            if p.requires_grad and p not in state:
                init_state(state[p], p, g["s_init"], unstepped)


__all__ = ["STREAM_KEY", "UNSTEPPED_KEY", "add_stream_and_states", "normalised", "checked", "saved_states",
           "restore_states"]
