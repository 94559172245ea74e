"""bSAM with DistributedDataParallel on scikit-learn's digits.

    torchrun --nproc_per_node=2 examples/ddp_train.py [--epochs 20] [--parts 2]

gloo on CPU, NCCL when every rank has a GPU. Each rank draws its own noise and perturbs
its own shard (m local parts); perturbed gradients are averaged by DDP, u by BSAM.step.
Rank 0 prints test accuracy and NLL at the mean and of the posterior predictive.
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from bsam_fast import BSAM, split_batch
from bsam_fast.demo import load_digits_split
from bsam_fast.distributed import ddp_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="global batch size")
    ap.add_argument("--parts", dest="m", type=int, default=2, help="local parts per rank")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)

    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
    torch.manual_seed(args.seed)                                # same initial weights everywhere
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    model = DDP(net, device_ids=[device.index] if use_cuda else None)
    n = len(x_tr)
    opt = BSAM(model.parameters(), lr=0.1, num_data=n, rho=0.01, weight_decay=10.0 / n,
               seed=args.seed, process_group=True)
    local = args.batch // world
    if local % args.m:
        raise SystemExit(f"--batch/{world} ranks = {local} is not divisible into m={args.m} parts")
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=g)                  # same permutation on every rank
        for i in range(0, n - args.batch + 1, args.batch):
            idx = perm[i + rank * local: i + (rank + 1) * local]
            parts = split_batch(x_tr[idx].to(device), y_tr[idx].to(device), m=args.m)
            loss = ddp_step(model, opt, lambda k: F.cross_entropy(model(parts[k][0]), parts[k][1]), args.m)
        if rank == 0 and (epoch + 1) % 5 == 0:
            print(f"epoch {epoch + 1}: loss at perturbed points {loss.item():.4f}")
    if rank == 0:
        x_te, y_te = x_te.to(device), y_te.to(device)
        with torch.no_grad():
            at_mean = net(x_te).softmax(1)
            probs = torch.zeros_like(at_mean)
            sampler = torch.Generator(device=device).manual_seed(args.seed)
            for _ in range(32):
                with opt.sampled_params(generator=sampler):
                    probs += net(x_te).softmax(1) / 32
        for name, p in (("mean", at_mean), ("posterior predictive (32 samples)", probs)):
            acc = (p.argmax(1) == y_te).float().mean().item()
            nll = F.nll_loss(p.clamp_min(1e-12).log(), y_te).item()
            print(f"{name}: accuracy {acc:.4f}, NLL {nll:.4f}")
        print(f"world size {world}, {args.m} local parts per rank, backend {opt.backend}")


if __name__ == "__main__":
    main()
    # The DDP model (its reducer) gone and every rank here before the process group goes:
    # otherwise the process can abort at exit.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
