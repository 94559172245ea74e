"""Worker functions for test_distributed.py (spawned processes must import them by name)."""
import datetime
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from bsam_fast import BSAM, split_batch
from bsam_fast.ddp import ddp_step
from helpers import make_model

STEPS, M, LOCAL_BATCH = 3, 2, 8


def setup(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    torch.set_num_threads(1)


def teardown():
    """Every DDP model gone and every rank here before the group goes: a DDP reducer that
    outlives its process group aborts the process at exit (seen as a flaky SIGABRT)."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def global_batch(step, world, dtype):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(LOCAL_BATCH * world, 1, 5, 5, generator=g).to(dtype)
    y = torch.randint(0, 3, (LOCAL_BATCH * world,), generator=g)
    return x, y


def make(dtype, seed=None):
    net = make_model(dtype=dtype)
    model = DDP(net)
    opt = BSAM(model.parameters(), lr=0.05, num_data=200, rho=0.05, weight_decay=0.01,
               backend=os.environ.get("BSAM_TEST_BACKEND", "auto"),
               seed=(1234 + dist.get_rank()) if seed is None else seed, process_group=True)
    return net, model, opt


def train(net, model, opt, steps, first_step, world, rank, dtype):
    for t in range(first_step, first_step + steps):
        x, y = global_batch(t, world, dtype)
        xs, ys = x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH], y[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        parts = split_batch(xs, ys, m=M)
        ddp_step(model, opt, lambda k: F.cross_entropy(model(parts[k][0]), parts[k][1]), M)


def state_of(net, opt):
    out = {}
    for name, p in net.named_parameters():
        out[name] = p.detach().clone()
        out[name + ".gm"] = opt.state[p]["momentum"].clone()
        out[name + ".s"] = opt.state[p]["precision"].clone()
    return out


def worker_train(rank, world, port, out_dir, dtype_name):
    """STEPS steps of m=2 local parts; saves each rank's final state and its noise key."""
    setup(rank, world, port)
    dtype = getattr(torch, dtype_name)
    net, model, opt = make(dtype)
    train(net, model, opt, STEPS, 0, world, rank, dtype)
    torch.save({"state": state_of(net, opt), "seed": opt.noise_seed, "key": opt._noise_key},
               os.path.join(out_dir, f"rank{rank}.pt"))
    teardown()


def worker_checkpoint(rank, world, port, out_dir):
    """6 steps straight vs 3 steps, checkpoint on rank 0, load on all ranks, 3 more."""
    setup(rank, world, port)
    dtype = torch.float64
    net, model, opt = make(dtype, seed=77)
    train(net, model, opt, 6, 0, world, rank, dtype)
    straight = state_of(net, opt)
    net, model, opt = make(dtype, seed=77)
    train(net, model, opt, 3, 0, world, rank, dtype)
    path = os.path.join(out_dir, "ck.pt")
    if rank == 0:
        torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    net, model, opt = make(dtype, seed=5)             # a different seed: the checkpoint's wins
    ck = torch.load(path)
    net.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    train(net, model, opt, 3, 3, world, rank, dtype)
    resumed = state_of(net, opt)
    torch.save({"straight": straight, "resumed": resumed}, os.path.join(out_dir, f"ck{rank}.pt"))
    teardown()


def worker_one_rank_raises(rank, world, port, out_dir):
    setup(rank, world, port)
    if rank == 1:
        raise RuntimeError("rank 1 fails before its first step")
    dtype = torch.float32
    try:
        net, model, opt = make(dtype)
        train(net, model, opt, 1, 0, world, rank, dtype)
        outcome = "finished"
    except Exception as exc:          # the collective fails or times out instead of hanging
        outcome = f"error: {type(exc).__name__}"
    with open(os.path.join(out_dir, "rank0.txt"), "w") as f:
        f.write(outcome)


def worker_kept_plan(rank, world, port, out_dir):
    """After each change a DDP step's plan must see (the state loaded back, a parameter's
    storage replaced), 2 more steps with the kept plan equal those of a freshly built
    optimizer on a copy of the model, loaded from the same state."""
    import copy
    setup(rank, world, port)
    dtype = torch.float64
    results = {}
    for change in ("load_state_dict", "storage replaced"):
        net, model, opt = make(dtype, seed=77)
        train(net, model, opt, 2, 0, world, rank, dtype)          # the plan is built and kept
        if change == "load_state_dict":
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        else:
            p = next(net.parameters())
            p.data = p.data.clone()
        fresh_net, fresh_model, fresh = make(dtype, seed=77)
        with torch.no_grad():
            for a, b in zip(fresh_net.parameters(), net.parameters()):
                a.copy_(b)
        fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
        train(net, model, opt, 2, 2, world, rank, dtype)
        train(fresh_net, fresh_model, fresh, 2, 2, world, rank, dtype)
        kept, new = state_of(net, opt), state_of(fresh_net, fresh)
        results[change] = all(torch.equal(kept[k], new[k]) for k in kept)
        del model, fresh_model
    torch.save(results, os.path.join(out_dir, f"kept{rank}.pt"))
    teardown()
