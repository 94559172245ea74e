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

import itertools
import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from .backends.base import Bucket, opmath_dtype
from .sharded import is_sharded, local
from ._checks import check_backend_takes
from .tensor_state import init_state, refresh_unstepped, scratch_buffer

_requires_grad = operator.attrgetter("requires_grad")
_NONE: dict = {}
_table_keys = itertools.count()       # unique over the process: a key is never reused


def buckets_of(params: list[Tensor], state, noise_base: dict, scratch: dict, keyed: bool = False) -> list[Bucket]:
    """Buckets of the parameters (local shards of FSDP2 parameters), by device and dtype,
    and apart those whose noise does not start at a Philox block (a shard starting
    mid-block: the fused kernels cannot draw it, see ``FusedBackend.sample``). keyed: each
    gets a table key of its own (a plan's buckets, kept across steps)."""
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
            aligned=aligned,
            table_key=next(_table_keys) if keyed else None))
    return buckets


@dataclass
class GroupPlan:
    params: list[Tensor]       # the group's parameters in the posterior, in group order
    buckets: list[Bucket]


class StepPlan:
    def __init__(self, param_groups: list[dict], state, noise_base: dict, scratch: dict,
                 backend_checks_inputs: bool = False):
        # Each parameter's state dict, looked up once (a lookup hashes the tensor in Python):
        # its tensors are compared at every step, the dicts themselves replaced only by
        # load_state_dict, which drops the plan.
        self._states = [[state.get(p, _NONE) for p in group["params"]] for group in param_groups]
        self.groups = []
        for group in param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            self.groups.append(GroupPlan(params, buckets_of(params, state, noise_base, scratch, keyed=True)))
        self.sharded = any(is_sharded(p) for g in param_groups for p in g["params"])
        # A backend that checks its inputs may be handed .grad unchecked (see phases.py);
        # DTensor gradients are made local (and checked) in Python.
        self.trusts_gradients = backend_checks_inputs and not self.sharded
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


def active_work(plan: StepPlan, sampled: list, param_groups: list[dict], state, noise_base: dict, scratch: dict,
                earlier: Optional[list]) -> tuple[list, list, list]:
    """perturb()'s split of the step's work by the gradient at the noisy point: (per group,
    the parameters with one; their work; the work of those without). Refused when no
    parameter has a gradient, or (a later part: ``earlier``, the first part's) when the
    set changed between the parts of one step."""
    # (list comprehensions: a generator would cost a Python call per tensor)
    if not [p for _, buckets in sampled for b in buckets for p in b.owners if p.grad is None]:
        active, work, idle = [gp.params for gp in plan.groups], sampled, []     # the usual case
    else:
        active, work, idle = split_by_gradient(plan, param_groups, state, noise_base, scratch)
    if not any(active) and any(gp.params for gp in plan.groups):
        raise RuntimeError("perturb(): no parameter has a gradient at the noisy point; call backward() on "
                           "the loss after sample_noise() and before perturb() (a bSAM step takes a "
                           "gradient at the noisy point, then one at the perturbed point)")
    if earlier is not None and [list(map(id, a)) for a in active] != [list(map(id, a)) for a in earlier]:
        raise RuntimeError("perturb(): the set of parameters with gradients changed between the parts of "
                           "one step")
    return active, work, idle


class PlanCache:
    """Holds the current plan. One object, changed in place, so that a copy of the
    optimizer's ``__dict__`` (Lightning's wrapper) shares it."""

    def __init__(self):
        self.plan = None

    def drop(self) -> None:
        self.plan = None

    def refresh(self, param_groups: list[dict], state, unstepped: set) -> None:
        """The initial state made again where its group's s_init or the parameter changed
        (before a parameter's first step only); the plan is then made again."""
        if refresh_unstepped(param_groups, state, unstepped):
            self.plan = None

    def current(self, param_groups: list[dict], state, noise_base: dict, scratch: dict, unstepped: set,
                backend) -> StepPlan:
        """The step plan, made again when what it was built from has changed: then the
        parameters unfrozen since get their state, and those converted since (e.g. to
        channels_last) are checked against the backend."""
        self.refresh(param_groups, state, unstepped)
        if self.plan is None or not self.plan.is_current(param_groups):
            for g, group in enumerate(param_groups):
                for i, p in enumerate(group["params"]):
                    if p not in noise_base:      # its place in the noise stream is given on entry
                        raise ValueError(f"param_groups[{g}]['params'][{i}] (shape {tuple(p.shape)}) was put "
                                         "there directly, not given to the optimizer: pass new parameters "
                                         "with add_param_group(), or build a new optimizer")
                    if p.requires_grad:
                        init_state(state[p], p, group["s_init"], unstepped)
                check_backend_takes(backend, [p for p in group["params"] if p.requires_grad])
            self.plan = StepPlan(param_groups, state, noise_base, scratch, backend.checks_inputs)
        return self.plan
