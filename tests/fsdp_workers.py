"""Worker functions for test_fsdp.py: bSAM on a model sharded by FSDP2's fully_shard, gloo
on CPU (spawned processes import these by name)."""
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

from bsam_fast import BSAM, split_batch
from bsam_fast.predict import predict_bma
from dist_workers import setup, teardown
from helpers import make_model

GLOBAL_BATCH, DTYPE = 12, torch.float64        # 12: the same global batch on 2 and 3 ranks
HYPER = dict(lr=0.05, num_data=200, rho=0.05, weight_decay=0.01)


def global_batch(step):
    """The step's global batch; rank r of W takes rows rank_rows(r, W)."""
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(GLOBAL_BATCH, 1, 5, 5, generator=g).to(DTYPE),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))


def rank_rows(rank, world):
    size = GLOBAL_BATCH // world
    return slice(rank * size, (rank + 1) * size)


def sharded_model(mesh=None):
    """MixedNet (rows of 9, 27 and 7 elements: shards start mid-Philox-block on 3 ranks,
    and the 1-element `scale` leaves empty shards) with every layer fully_shard-ed (on
    `mesh`; default: fully_shard's, on the accelerator if there is one)."""
    net = make_model(dtype=DTYPE)
    for layer in (net.conv, net.fc1, net.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def make(backend, seed):
    net = sharded_model()
    return net, BSAM(net.parameters(), **HYPER, backend=backend, seed=seed)


def train(net, opt, first, steps, world, m):
    rank = dist.get_rank()
    noisy = []
    for t in range(first, first + steps):
        x, y = global_batch(t)
        rows = rank_rows(rank, world)
        with torch.no_grad():       # an evaluation: FSDP2 then keeps the root's parameters
            net(x[rows])            # gathered, and BSAM must reshard before it writes
        one_step(net, opt, split_batch(x[rows], y[rows], m=m), lambda: noisy.append(full(net)))
    return noisy


def one_step(net, opt, parts, at_noisy_point):
    """m = 1: the phase API, calling at_noisy_point() there; m > 1: step_parts."""
    if len(parts) == 1:
        opt.zero_grad()
        opt.sample_noise()
        at_noisy_point()
        F.cross_entropy(net(parts[0][0]), parts[0][1]).backward()
        opt.perturb()
        F.cross_entropy(net(parts[0][0]), parts[0][1]).backward()
        opt.step()
        return

    def closure(k):
        opt.zero_grad()
        loss = F.cross_entropy(net(parts[k][0]), parts[k][1])
        loss.backward()
        return loss
    opt.step_parts(closure, len(parts))


def full(net):
    with torch.no_grad():
        return {name: p.full_tensor().clone() for name, p in net.named_parameters()}


def full_state(net, opt):
    """Mean, momentum and precision gathered from the shards (via the DTensor state_dict)."""
    out = full(net)
    sd = opt.state_dict()
    for i, (name, _) in enumerate(net.named_parameters()):
        out[name + ".gm"] = sd["state"][i]["momentum"].full_tensor()
        out[name + ".s"] = sd["state"][i]["precision"].full_tensor()
    return out


def worker_train(rank, world, port, out_dir, backend, m):
    """Training steps, the posterior on the sharded model, and state bytes per rank."""
    setup(rank, world, port)
    net, opt = make(backend, seed=77 if rank == 0 else 1000 + rank)   # rank 0's seed wins
    noisy = train(net, opt, 0, 3, world, m)
    offset = opt.noise_offset
    stds = [s.full_tensor() for s in opt.posterior_std()]
    x, _ = global_batch(99)
    bma = predict_bma(net, opt, x, samples=4, generator=torch.Generator().manual_seed(5))
    with opt.sampled_params(generator=torch.Generator().manual_seed(6)):
        sample = full(net)
        with torch.no_grad():
            at_sample = net(x)
    with torch.no_grad():
        after = net(x)              # the mean again, not the sample gathered before
    given = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=DTYPE)
             for i, p in enumerate(net.parameters())]           # full-shape noise, cut to rows
    opt.sample_noise(given)
    noisy_given = full(net)
    opt.cancel_step()
    out = {"state": full_state(net, opt), "noisy": noisy, "stds": stds, "bma": bma,
           "sample": sample, "at_sample": at_sample, "after": after, "noisy_given": noisy_given, "seed": opt.noise_seed, "offset": offset,
           "bytes": opt.memory_footprint(), "backend": opt.backend}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    teardown()


def save_checkpoint(net, opt, path):
    dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)},
             checkpoint_id=path)


def load_checkpoint(net, opt, path):
    state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, opt, state["optim"])


def worker_checkpoint_save(rank, world, port, out_dir, backend):
    """3 steps, a distributed checkpoint, 3 more steps: the straight run."""
    setup(rank, world, port)
    net, opt = make(backend, seed=77)
    train(net, opt, 0, 3, world, 1)
    save_checkpoint(net, opt, os.path.join(out_dir, "ck"))
    train(net, opt, 3, 3, world, 1)
    torch.save(full_state(net, opt), os.path.join(out_dir, f"straight{world}_{rank}.pt"))
    teardown()


def worker_checkpoint_resume(rank, world, port, out_dir, backend):
    """A new model and optimizer (another seed, untrained) load the checkpoint (written by
    any number of ranks) and take steps 3..5."""
    setup(rank, world, port)
    net, opt = make(backend, seed=5)
    load_checkpoint(net, opt, os.path.join(out_dir, "ck"))
    loaded = {"seed": opt.noise_seed, "offset": opt.noise_offset}
    train(net, opt, 3, 3, world, 1)
    torch.save({"state": full_state(net, opt), **loaded},
               os.path.join(out_dir, f"resumed{world}_{rank}.pt"))
    teardown()


def worker_refusals(rank, world, port, out_dir):
    """Placements other than FSDP2's are refused with a message naming them."""
    setup(rank, world, port)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    messages = []
    for placement in (Shard(1), Replicate()):
        weight = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [placement]))
        try:
            BSAM([weight], lr=0.1, num_data=10)
            messages.append("accepted")
        except ValueError as exc:
            messages.append(str(exc))
    net = sharded_model()
    for kwargs in (dict(process_group=True), dict(capturable=True, backend="cpu")):
        try:
            BSAM(net.parameters(), lr=0.1, num_data=10, **kwargs)
            messages.append("accepted")
        except ValueError as exc:
            messages.append(str(exc))
    try:
        with BSAM(net.parameters(), lr=0.1, num_data=10).sampled_params():
            pass
        messages.append("accepted")
    except ValueError as exc:
        messages.append(str(exc))
    torch.save(messages, os.path.join(out_dir, f"refused{rank}.pt"))
    teardown()


def worker_nonfinite(rank, world, port, out_dir, backend):
    """One step trained, then a step whose perturbed gradient holds inf in rank 1's rows
    only: every rank skips it (the flags are shared), nothing changes anywhere."""
    import warnings
    setup(rank, world, port)
    net, opt = make(backend, seed=77)
    train(net, opt, 0, 1, world, 1)
    before = full_state(net, opt)
    x, y = global_batch(1)
    rows = rank_rows(rank, world)
    opt.zero_grad()
    opt.sample_noise()
    F.cross_entropy(net(x[rows]), y[rows]).backward()
    opt.perturb()
    F.cross_entropy(net(x[rows]), y[rows]).backward()
    if rank == 1:
        net.fc1.weight.grad.to_local().view(-1)[0] = float("inf")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opt.step()
    after = full_state(net, opt)
    same = all(torch.equal(before[k], after[k]) for k in before)
    torch.save({"unchanged": same, "skipped": opt.skipped_steps}, os.path.join(out_dir, f"inf{rank}.pt"))
    teardown()


def worker_kept_plan(rank, world, port, out_dir, backend):
    """After the state is loaded back (what the plan must see on a sharded model), 2 more
    steps with the kept plan equal those of a freshly built optimizer on a copy of the
    model, loaded from the same state."""
    import copy
    setup(rank, world, port)
    net, opt = make(backend, seed=77)
    train(net, opt, 0, 2, world, 2)                 # the plan is built and kept
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    fresh_net, fresh = make(backend, seed=77)
    with torch.no_grad():
        for a, b in zip(fresh_net.parameters(), net.parameters()):
            a.to_local().copy_(b.to_local())
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(net, opt, 2, 2, world, 2)
    train(fresh_net, fresh, 2, 2, world, 2)
    kept, new = full_state(net, opt), full_state(fresh_net, fresh)
    torch.save(all(torch.equal(kept[k], new[k]) for k in kept), os.path.join(out_dir, f"kept{rank}.pt"))
    teardown()
