"""bSAM with FSDP2 (fully_shard) on scikit-learn's digits.

    torchrun --nproc_per_node=2 examples/fsdp_train.py [--epochs 20] [--parts 1] [--width 512]

gloo on CPU, NCCL when every rank has a GPU. Every rank holds a shard (a block of rows) of
every parameter and of bSAM's state; the forward pass gathers the full parameters, so all
ranks evaluate the same noisy and perturbed points: one noise sample per global batch (or
per global part with --parts > 1). Prints, per rank, the bytes of optimizer state it holds
(against one replica's, which DDP keeps on every rank), then test accuracy and NLL at the
mean and of the posterior predictive.
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

from bsam_fast import BSAM
from bsam_fast.demo import load_digits_split
from bsam_fast.predict import predict_bma, predict_mean
from torchrun_setup import (destroy_process_group, init_process_group, local_batch_size,
                            print_scores, rank_parts)


def report_memory(net, opt, world, device):
    """Rank 0 prints the bytes each rank holds against one replica's (what DDP keeps on
    every rank): state (momentum, precision) and step scratch (mean, u), all fp32 here."""
    held = torch.tensor([[v for v in opt.memory_footprint().values()]], device=device)
    every = [torch.zeros_like(held) for _ in range(world)]
    dist.all_gather(every, held)
    replica = sum(p.numel() for p in net.parameters()) * 4      # global numel, fp32
    if dist.get_rank() == 0:
        for r, (state, scratch) in enumerate(t[0].tolist() for t in every):
            print(f"rank {r}: bSAM state {state} B, scratch {scratch} B")
        print(f"one replica (DDP, on every rank): state {2 * replica} B, scratch {2 * replica} B")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="global batch size")
    ap.add_argument("--parts", dest="m", type=int, default=1, help="parts per rank (each its own noise sample)")
    ap.add_argument("--width", type=int, default=512, help="hidden units")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rank, world, device = init_process_group()

    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
    torch.manual_seed(args.seed)                                # same initial weights everywhere
    net = nn.Sequential(nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, args.width),
                        nn.ReLU(), nn.Linear(args.width, 10)).to(device)
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(net)
    n = len(x_tr)
    opt = BSAM(net.parameters(), lr=0.1, num_data=n, rho=0.01, weight_decay=10.0 / n, seed=args.seed)
    local = local_batch_size(args.batch, world, args.m)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        for parts in rank_parts(x_tr, y_tr, args.batch, local, args.m, g, device):
            def closure(k):
                opt.zero_grad()
                loss = F.cross_entropy(net(parts[k][0]), parts[k][1])
                loss.backward()
                return loss
            loss = opt.step_parts(closure, args.m)
        if rank == 0 and (epoch + 1) % 5 == 0:
            print(f"epoch {epoch + 1}: loss at perturbed points {loss.item():.4f}")

    report_memory(net, opt, world, device)
    x_te, y_te = x_te.to(device), y_te.to(device)
    at_mean = predict_mean(net, x_te)                           # every rank takes part
    sampler = torch.Generator(device=device).manual_seed(args.seed)   # alike on every rank
    bma = predict_bma(net, opt, x_te, samples=32, generator=sampler)
    if rank == 0:
        print_scores({"mean": at_mean, "posterior predictive (32 samples)": bma}, y_te)
        print(f"world size {world}, {args.m} parts per rank, backend {opt.backend}")


if __name__ == "__main__":
    main()
    destroy_process_group()
