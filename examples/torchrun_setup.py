"""What the torchrun examples share: the process group from torchrun's environment, each
rank's rows of a global batch, the printed scores, and the teardown."""
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bsam_fast import split_batch


def init_process_group():
    """gloo on CPU, NCCL when every rank has a GPU. Returns (rank, world size, device)."""
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    return dist.get_rank(), dist.get_world_size(), device


def local_batch_size(batch, world, m):
    """This rank's share of a global batch; it must split into m parts."""
    local = batch // world
    if local % m:
        raise SystemExit(f"--batch/{world} ranks = {local} is not divisible into m={m} parts")
    return local


def rank_parts(x, y, batch, local, m, generator, device):
    """One epoch: every rank draws the same permutation (same generator state), then takes its
    own rows of each global batch, split into m parts."""
    rank, n = dist.get_rank(), len(x)
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n - batch + 1, batch):
        idx = perm[i + rank * local: i + (rank + 1) * local]
        yield split_batch(x[idx].to(device), y[idx].to(device), m=m)


def print_scores(probs_by_name, y):
    for name, p in probs_by_name.items():
        acc = (p.argmax(1) == y).float().mean().item()
        nll = F.nll_loss(p.clamp_min(1e-12).log(), y).item()
        print(f"{name}: accuracy {acc:.4f}, NLL {nll:.4f}")


def destroy_process_group():
    """The model and optimizer (DDP's reducer, FSDP2's state with them) gone and every rank
    here before the process group goes: otherwise the process can abort at exit."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
