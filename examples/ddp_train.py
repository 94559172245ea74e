"""bSAM with DistributedDataParallel on scikit-learn's digits.

    torchrun --nproc_per_node=2 examples/ddp_train.py [--epochs 20] [--parts 2]

gloo on CPU, NCCL when every rank has a GPU. Each rank draws its own noise and perturbs
its own shard (m local parts); perturbed gradients are averaged by DDP, u by BSAM.step.
Rank 0 prints test accuracy and NLL at the mean and of the posterior predictive.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from bsam_fast import BSAM
from bsam_fast.demo import load_digits_split
from bsam_fast.ddp import ddp_step
from torchrun_setup import (destroy_process_group, init_process_group, local_batch_size,
                            print_scores, rank_parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="global batch size")
    ap.add_argument("--parts", dest="m", type=int, default=2, help="local parts per rank")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rank, world, device = init_process_group()

    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
    torch.manual_seed(args.seed)                                # same initial weights everywhere
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    n = len(x_tr)
    opt = BSAM(model.parameters(), lr=0.1, num_data=n, rho=0.01, weight_decay=10.0 / n,
               seed=args.seed, process_group=True)
    local = local_batch_size(args.batch, world, args.m)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        for parts in rank_parts(x_tr, y_tr, args.batch, local, args.m, g, device):
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
        print_scores({"mean": at_mean, "posterior predictive (32 samples)": probs}, y_te)
        print(f"world size {world}, {args.m} local parts per rank, backend {opt.backend}")


if __name__ == "__main__":
    main()
    destroy_process_group()
