"""The step plan: the tensor lists every phase of a step works on, built once and reused.

A plan holds, per param group, the parameters in the posterior (``requires_grad``) and
their *buckets*: the parameters of one device and dtype (and apart, FSDP2 shards whose
noise does not start at a Philox block), each with its means, momenta, precisions, u
buffers and noise bases (``backends.base.Bucket``). A backend's phase is one call per
bucket, so a step costs a few calls whatever the number of tensors.

Building a plan validates nothing per step and allocates the scratch buffers; checking
that it still holds is one pass over the parameters without a Python call per tensor
(``is_current``): the same tensors in the same groups, the same ``requires_grad``, the
same storage (a model converted or moved after construction, ``p.data = ...``), the same
state tensors (state moved or offloaded by assigning ``opt.state[p][k]``). What the optimizer changes
itself (``add_param_group``, ``load_state_dict``, state made again before the first step)
drops the plan explicitly.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

from torch import Tensor

from .backends.base import Bucket, opmath_dtype
from .sharded import is_sharded, local
from .tensor_state import scratch_buffer

_requires_grad = operator.attrgetter("requires_grad")
_NONE: dict = {}


def buckets_of(params: list[Tensor], state, noise_base: dict, scratch: dict) -> list[Bucket]:
    """Buckets of the parameters (local shards of FSDP2 parameters), by device and dtype,
    and apart those whose noise does not start at a Philox block (a shard starting
    mid-block: the fused kernels cannot draw it, see ``FusedBackend.sample``)."""
    by_key: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in params:
        by_key[(p.device, p.dtype, noise_base[p] % 4 == 0)].append(p)
    buckets = []
    for (_, dtype, aligned), ps in by_key.items():
        states = [state[p] for p in ps]
        master = opmath_dtype(dtype) != dtype
        buckets.append(Bucket(
            params=[local(p) for p in ps],
            means=[st["mean"] if master else scratch_buffer(scratch, p, "mean") for p, st in zip(ps, states)],
            momenta=[st["momentum"] for st in states],
            precisions=[st["precision"] for st in states],
            u_sums=[scratch_buffer(scratch, p, "u") for p in ps],
            bases=[noise_base[p] for p in ps],
            master_mean=master,
            owners=ps,
            aligned=aligned))
    return buckets


@dataclass
class GroupPlan:
    params: list[Tensor]       # the group's parameters in the posterior, in group order
    buckets: list[Bucket]


class StepPlan:
    def __init__(self, param_groups: list[dict], state, noise_base: dict, scratch: dict):
        # Each parameter's state dict, looked up once (a lookup hashes the tensor in Python):
        # its tensors are compared at every step, the dicts themselves replaced only by
        # load_state_dict, which drops the plan.
        self._states = [[state.get(p, _NONE) for p in group["params"]] for group in param_groups]
        self.groups = []
        for group in param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            self.groups.append(GroupPlan(params, buckets_of(params, state, noise_base, scratch)))
        self.sharded = any(is_sharded(p) for g in param_groups for p in g["params"])
        self._stamp = self._stamp_of(param_groups)

    def _stamp_of(self, param_groups: list[dict]) -> list:
        stamp = []
        for group, states in zip(param_groups, self._states):
            params = group["params"]
            tensors = [local(p) for p in params] if self.sharded else params
            stamp.append((list(map(id, params)), list(map(_requires_grad, params)), list(map(id, tensors)),
                          list(map(Tensor.data_ptr, tensors)), [id(st.get("momentum")) for st in states],
                          [id(st.get("precision")) for st in states], [id(st.get("mean")) for st in states]))
        return stamp

    def is_current(self, param_groups: list[dict]) -> bool:
        """True if the parameters are those the plan was built from (see the module docstring)."""
        return len(param_groups) == len(self.groups) and self._stamp_of(param_groups) == self._stamp


def split_by_gradient(plan: StepPlan, param_groups: list[dict], state, noise_base: dict,
                      scratch: dict) -> tuple[list, list, list]:
    """When some parameters have no gradient: (per group, those with one; buckets of those;
    buckets of those without), made for this step."""
    active = [[p for p in gp.params if p.grad is not None] for gp in plan.groups]
    idle = [[p for p in gp.params if p.grad is None] for gp in plan.groups]

    def work(per_group):
        return [(g, buckets_of(ps, state, noise_base, scratch)) for g, ps in zip(param_groups, per_group)]
    return active, work(active), work(idle)


class PlanCache:
    """Holds the current plan. One object, changed in place, so that a copy of the
    optimizer's ``__dict__`` (Lightning's wrapper) shares it."""

    def __init__(self):
        self.plan = None

    def drop(self) -> None:
        self.plan = None
