"""Where the time of a batched m-part bSAM step goes (``func.step_batched``), beside the
m = 1 step, on one CPU thread: the MNIST MLP, batch 128, m = 8, the ``cpu`` backend.

    python benchmarks/profile_batched.py [--model mlp] [--out benchmarks/results/cpu_batched_breakdown.txt]

Times every stage of the step by wrapping the functions ``step_batched`` calls (the
checks, the m noisy points, the two vmap'd forward/backward passes, the m perturbations,
the update), summed over 20 steps after 5 untimed ones, and the whole step; then sets the
stages that do not shrink with batching (the optimizer's m noise draws and m
perturbations) against the budget of 1.6x the m = 1 step.

Last, the floor under any batched step on this machine, whatever the optimizer does: the
two vmap'd forward/backward passes alone (step_batched's own, func._parts_gradients, over
m weight copies) plus the m noise draws alone (the noise kernel into preallocated
buffers: each part has its own draw of every parameter, at the stream positions
step_parts uses), against the m = 1 step.
"""
import argparse
import collections
import time

import torch
import torch.nn.functional as F

import bsam_fast.func as func
from bsam_fast.bench_e2e import training_step
from bsam_fast.experiments.models import INPUT_SHAPES, make_model
from bsam_fast.noise import noise_bases
from bsam_fast.optimizer import BSAM
from bsam_fast.timing import device_name, median_ms

STAGES = {"_check": "argument checks", "_check_every_parameter_used": "parameter-use check (1 example)",
          "_sample_parts": "m noisy points (m noise draws)", "_perturb_parts": "m perturbations"}


def floor_ms(model_name: str, batch: int, m: int, reps: int) -> dict[str, float]:
    """Medians in ms of what any batched step does besides the optimizer's own work: the two
    vmap'd forward/backward passes over m weight copies (step_batched's own
    _parts_gradients), and the m noise draws of every parameter alone (the noise kernel into
    preallocated buffers); and the m = 1 step's two passes, for comparison."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = make_model(model_name)
    names, params = zip(*model.named_parameters())
    x, y = torch.randn(batch, *INPUT_SHAPES[model_name]), torch.randint(0, 10, (batch,))
    stacks = [p.detach().expand(m, *p.shape).contiguous() for p in params]
    grads_of = func._parts_gradients(model, names, F.cross_entropy, x, y, m)
    buffers = [torch.empty_like(p) for p in params]
    bases = noise_bases([p.numel() for p in params])

    def two_passes():
        for _ in range(2):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()

    def m_draws():
        for k in range(m):
            torch.ops.bsam_fast.normal_(buffers, bases, 0, k)
    return {"batched passes": 2 * median_ms(lambda: grads_of(stacks), cpu, reps),
            "draws": median_ms(m_draws, cpu, reps),
            "m = 1 passes": median_ms(two_passes, cpu, reps)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.batch % 8:
        ap.error(f"--batch {args.batch}: the batch must split into m = 8 equal parts")
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    seconds = collections.defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - t0
        return wrapper
    originals = {name: getattr(func, name) for name in STAGES}
    vmap, update = torch.func.vmap, BSAM.step
    for name, label in STAGES.items():
        setattr(func, name, timed(label, originals[name]))
    torch.func.vmap = lambda f, *a, **k: timed("2 vmap'd forward/backward passes", vmap(f, *a, **k))
    BSAM.step = timed("update", update)
    try:
        step = training_step(args.model, "bsam_m8_batched", "cpu", cpu, args.batch)
        for _ in range(5):
            step()
        seconds.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        total = (time.perf_counter() - t0) / args.steps * 1e3
    finally:
        for name, fn in originals.items():
            setattr(func, name, fn)
        torch.func.vmap, BSAM.step = vmap, update
    single = median_ms(training_step(args.model, "bsam", "cpu", cpu, args.batch), cpu, args.steps)
    stage_ms = {name: s / args.steps * 1e3 for name, s in seconds.items()}
    fixed = stage_ms[STAGES["_sample_parts"]] + stage_ms[STAGES["_perturb_parts"]]
    lines = [f"# {device_name(cpu)}; torch {torch.__version__}; {args.model}, batch {args.batch}, "
             f"m = 8, cpu backend; mean of {args.steps} steps",
             f"{'stage of step_batched':<40}{'ms/step':>9}"]
    lines += [f"{name:<40}{ms:>9.2f}" for name, ms in stage_ms.items()]
    lines += [f"{'whole step':<40}{total:>9.2f}",
              f"{'m = 1 step (median)':<40}{single:>9.2f}",
              "",
              f"batched / m = 1: {total / single:.2f}x; a 1.6x budget is {1.6 * single:.2f} ms, of which the m noise "
              f"draws and m perturbations alone take {fixed:.2f} ms ({fixed / (1.6 * single):.0%})"]
    # This machine's timings drift by up to ~1.5x within minutes: the least of 3 medians each.
    rounds = [floor_ms(args.model, args.batch, 8, args.steps) for _ in range(3)]
    floor = {key: min(r[key] for r in rounds) for key in rounds[0]}
    single = min([single] + [median_ms(training_step(args.model, "bsam", "cpu", cpu, args.batch), cpu, args.steps)
                             for _ in range(2)])
    least = floor["batched passes"] + floor["draws"]
    lines += [f"floor (least of 3 medians each): 2 x one vmap'd pass alone {floor['batched passes']:.2f} ms + "
              f"the 8 noise draws alone {floor['draws']:.2f} ms = {least:.2f} ms, {least / single:.2f}x the "
              f"m = 1 step's {single:.2f} ms (whose own 2 passes take {floor['m = 1 passes']:.2f} ms)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
