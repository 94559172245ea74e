"""`table`: each method with its selected hyperparameters (``--tuned tuned.json``, else the
defaults), trained on the whole training set with every seed, scored on the test set.

Every (method, seed) run is stored as it ends (``store.RunStore`` under ``<out>/runs``), so
an interrupted table restarted with the same arguments trains only what is missing. A run's
record holds its metrics, bSAM's predictive for several sample counts (the paper's Table
4), its reliability bins, and the NLL at the mean after every epoch on the test set (the
convergence curve) and on a fixed sample of the training set. From the records:
results.json, table.md (mean ± std over the seeds), reliability.png (first seed) and
convergence.png.

A tuned selection can be stable on the tuner's short budget and diverge on the table's
longer one. A selection whose training NLL diverges in any seed (``diverged``) is therefore
replaced by the tuner's selection among the configurations it trained with a smaller
learning rate, and the table says so; one with no smaller learning rate left is reported
as diverged. The rule looks at training data only, never at the test set.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch

from .. import metrics
from . import data
from .models import model_for
from .store import RunStore
from .training import DEFAULTS, METHODS, extra_settings, evaluate, predictive, time_steps, train
from .tuning import config_from, select

OOD_PARTNER = {"mnist": "fashion_mnist", "fashion_mnist": "mnist"}
LABELS = {"sgd": "SGD", "adam": "Adam", "sam_sgd": "SAM-SGD", "sam_adam": "SAM-Adam", "bsam": "bSAM",
          "ivon": "IVON", "swag": "SWAG", "laplace": "Laplace (at SGD)", "bsam_nonoise": "bSAM without noise"}
METRIC_KEYS = ("accuracy", "nll", "ece", "auroc", "brier", "ood_auroc")
METRIC_NAMES = {"accuracy": "accuracy (%)", "nll": "NLL", "ece": "ECE", "auroc": "AUROC", "brier": "Brier",
                "ood_auroc": "OOD AUROC"}
BUDGET_DEFAULTS = (("epochs", 5), ("batch", 128), ("warmup_epochs", 1.0))
TRAIN_PROBE = 10_000      # training examples whose NLL is tracked (a seeded sample)


def resolve_budget(args, protocol: dict) -> None:
    """Epochs, batch and warm-up: as given, else the tuner's (--tuned), else the defaults;
    the tuner's --augment (with its --data-factor) and --batched-parts too."""
    for name, default in BUDGET_DEFAULTS:
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, protocol.get(name, default))
    for flag in ("augment", "batched_parts"):
        if protocol.get(flag) and hasattr(args, flag):
            setattr(args, flag, True)
    if protocol.get("data_factor") is not None and getattr(args, "data_factor", 0) is None:
        args.data_factor = protocol["data_factor"]


def mean_std(values: list[float]) -> dict:
    """Mean and std over the seeds whose value is finite (n of them; a diverged run, or an
    undefined AUROC, is left out and shows in n and runs)."""
    t = torch.tensor(values, dtype=torch.float64)
    ok = t[torch.isfinite(t)]
    return {"mean": ok.mean().item() if len(ok) else math.nan,
            "std": ok.std().item() if len(ok) > 1 else 0.0, "n": len(ok), "runs": values}


def _choices(args) -> tuple[dict, Optional[dict]]:
    """(method -> hyperparameters, the tuner's output or None): the tuner's selections, or
    the defaults with overrides."""
    if args.tuned:
        with open(args.tuned) as f:
            tuned = json.load(f)
        given = [flag for flag, value in (("--lr", args.lr), ("--rho", args.rho), ("--set", args.set),
                                          ("--m", args.m), ("--prior-precision", args.prior_precision))
                 if value is not None]
        if given:
            raise SystemExit(f"--tuned sets the hyperparameters: {', '.join(given)} would be ignored")
        resolve_budget(args, tuned["protocol"])
        methods = args.methods or list(tuned["selected"])
        missing = [m for m in methods if m not in tuned["selected"]]
        if missing:
            raise SystemExit(f"--tuned {args.tuned} has no selection for {', '.join(missing)}")
        return {m: tuned["selected"][m]["hparams"] for m in methods}, tuned
    resolve_budget(args, {})
    return {m: {"prior_precision": 10.0 if args.prior_precision is None else args.prior_precision,
                "m": 1 if args.m is None else args.m, **_overrides(args, m)}
            for m in (args.methods or list(METHODS))}, None


def smaller_lr_selection(tuned: Optional[dict], method: str, lr: Optional[float]) -> Optional[dict]:
    """The tuner's selection (same rule) among all the configurations it trained for
    `method` (those its axis shifts left behind too: what the edge rule would go back to)
    whose learning rate is below `lr`; None if there are none (or no learning rate)."""
    if tuned is None or lr is None:
        return None
    trials = [t for t in tuned.get("trials", {}).get(method, []) if t["hparams"].get("lr", math.inf) < lr * (1 - 1e-9)]
    return select(trials, "accuracy")["hparams"] if trials else None


def _overrides(args, method) -> dict:
    hp = {}
    if args.lr is not None:
        hp["lr"] = args.lr
    if args.rho is not None and "rho" in DEFAULTS[method]:
        hp["rho"] = args.rho
    for item in args.set or []:              # --set bsam.lr=0.2
        key, value = item.split("=", 1)
        m, name = key.split(".", 1)
        if m == method:
            hp[name] = float(value)
    return hp


def _one_run(args, method, choice, seed, x_tr, y_tr, x_te, y_te, x_ood, probe) -> dict:
    """Train one (method, seed) and score it: the record a RunStore keeps. `probe`: the
    training examples whose NLL at the mean is tracked."""
    cfg = config_from(method, choice, epochs=args.epochs, batch=args.batch, seed=seed, backend=args.backend,
                      warmup_epochs=args.warmup_epochs,
                      **extra_settings(getattr(args, "augment", False), getattr(args, "data_factor", None),
                                   getattr(args, "batched_parts", False)))
    curve, train_curve = [], []

    def on_epoch(epoch, model):          # NLL at the mean: has training converged, or diverged?
        curve.append(metrics.nll(torch.softmax(_logits(model, x_te), dim=1), y_te))
        train_curve.append(metrics.nll(torch.softmax(_logits(model, probe[0]), dim=1), probe[1]))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    trained = train(model_for(args.model, x_tr), cfg, x_tr, y_tr, progress=not args.no_progress,
                    desc=f"{LABELS[method]} seed {seed}", on_epoch=on_epoch)
    res = evaluate(trained, method, x_te, y_te, samples=args.samples, seed=seed, x_ood=x_ood)
    samples = {}
    if method in ("bsam", "bsam_nonoise"):
        for s in args.sample_counts:       # the paper's Table 4: samples in the predictive
            samples[str(s)] = metrics.all_metrics(predictive(trained, method, x_te, samples=s, seed=seed), y_te)
    reliability = {k: v.tolist() for k, v in metrics.reliability(res["pred"]["probs"], y_te).items()}
    return {"pred": _without_probs(res["pred"]), "mean": _without_probs(res["mean"]),
            "ms_per_step": trained.ms_per_step, "samples": samples, "reliability": reliability,
            "curve_test_nll_at_mean": curve, "curve_train_nll_at_mean": train_curve,
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def _logits(model, x, chunk: int = 2048):
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    model.train(was)
    return out


def _without_probs(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "probs"}


def run_table(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    choices, tuned = _choices(args)
    x_tr, y_tr = data.load_train(args.dataset, args.train_subset, args.data_root)
    x_te, y_te = data.load(args.dataset, "test", args.data_root)
    num_classes = data.NUM_CLASSES[args.dataset]
    probe_idx = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(0))[:TRAIN_PROBE]
    probe = (x_tr[probe_idx], y_tr[probe_idx])
    x_ood = None
    if args.dataset in OOD_PARTNER:
        try:
            x_ood = data.load(OOD_PARTNER[args.dataset], "test")[0]
        except data.DatasetNotFound as exc:
            print(f"(no OOD AUROC: {exc})")
    store = RunStore(os.path.join(args.out, "runs"))
    base = {"command": "table", "dataset": args.dataset, "model": args.model, "train_subset": args.train_subset,
            "epochs": args.epochs, "batch": args.batch, "warmup_epochs": args.warmup_epochs,
            "backend": args.backend, "samples": args.samples, "sample_counts": list(args.sample_counts),
            "ood": x_ood is not None,
            **extra_settings(getattr(args, "augment", False), getattr(args, "data_factor", None),
                                   getattr(args, "batched_parts", False))}

    def spec(method, seed):
        return {**base, "method": method, "hparams": choices[method], "seed": seed}
    _announce(args, {(m, seed): spec(m, seed) for m in choices for seed in args.seeds}, store, x_tr, y_tr)
    records, rejected = {}, {m: [] for m in choices}
    for method in choices:
        while True:
            fallback = smaller_lr_selection(tuned, method, choices[method].get("lr"))
            unstable = None
            for seed in args.seeds:
                record, cached = store.run(spec(method, seed), lambda: _one_run(
                    args, method, choices[method], seed, x_tr, y_tr, x_te, y_te, x_ood, probe))
                records[method, seed] = record
                print(f"{LABELS[method]} seed {seed}: acc {record['pred']['accuracy']:.4f} "
                      f"nll {record['pred']['nll']:.4f} ({record['ms_per_step']:.1f} ms/step)"
                      + (" (finished before)" if cached else ""), flush=True)
                if diverged(record.get("curve_train_nll_at_mean", []), num_classes):
                    unstable = seed
                    if fallback is not None:
                        break
            if unstable is None:
                break
            if fallback is None:
                print(f"{LABELS[method]}: {choices[method]} diverged in training (seed {unstable}) and no smaller "
                      "learning rate is left to take; reported as diverged", flush=True)
                break
            print(f"{LABELS[method]}: lr {choices[method]['lr']:g} diverged in training (seed {unstable}); "
                  f"taking the tuner's selection below it, lr {fallback['lr']:g}", flush=True)
            rejected[method].append({"hparams": choices[method], "seed": unstable, "curve_train_nll_at_mean":
                                     records[method, unstable]["curve_train_nll_at_mean"]})
            choices[method] = fallback
    results = {m: {**_summary(hp, [records[m, s] for s in args.seeds], num_classes), "rejected": rejected[m]}
               for m, hp in choices.items()}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "train_examples": len(x_tr), "num_classes": num_classes,
                   "results": results}, f, indent=1)
    print(write_table(args.out))
    first = args.seeds[0]
    metrics.reliability_diagram_of({LABELS[m]: records[m, first]["reliability"] for m in choices},
                                   os.path.join(args.out, "reliability.png"))
    plot_convergence({LABELS[m]: [records[m, s]["curve_test_nll_at_mean"] for s in args.seeds] for m in choices},
                     f"{args.dataset} / {args.model}", os.path.join(args.out, "convergence.png"))
    return results


def _announce(args, specs, store, x, y) -> None:
    """Print how many runs are left and their expected time (a few timed steps of each method)."""
    todo = [(m, seed) for (m, seed), spec in specs.items() if store.get(spec) is None]
    per_method = {}
    steps = args.epochs * (len(x) // args.batch)
    for method, seed in todo:
        if method not in per_method:
            cfg = config_from(method, specs[method, seed]["hparams"], epochs=args.epochs, batch=args.batch,
                              backend=args.backend)
            per_method[method] = time_steps(model_for(args.model, x), cfg, x, y) * steps / 1e3
    total = sum(per_method[m] for m, _ in todo)
    print(f"table: {len(todo)} runs to do of {len(specs)}, expected ~{total / 60:.0f} min (more if a selection "
          "diverges in training and gives way to a smaller learning rate)", flush=True)


def _summary(choice: dict, records: list[dict], num_classes: int) -> dict:
    out = {"hparams": choice, "ms_per_step": mean_std([r["ms_per_step"] for r in records]),
           "diverged_in_training": sum(diverged(r.get("curve_train_nll_at_mean", []), num_classes) for r in records)}
    for kind in ("pred", "mean"):
        out[kind] = {k: mean_std([r[kind][k] for r in records]) for k in METRIC_KEYS if k in records[0][kind]}
    out["samples"] = {s: {k: mean_std([r["samples"][s][k] for r in records]) for k in stats}
                      for s, stats in records[0]["samples"].items()}
    for curve in ("curve_test_nll_at_mean", "curve_train_nll_at_mean"):
        out[curve] = [r.get(curve, []) for r in records]     # (no training curve: a run from before it was kept)
    return out


def plot_convergence(curves: dict, title: str, path: str) -> None:
    """PNG: test NLL at the mean after every epoch, each method's seeds in one colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, runs) in enumerate(curves.items()):
        color = f"C{i % 10}"
        for k, curve in enumerate(runs):
            ax.plot(range(1, len(curve) + 1), curve, color=color, alpha=0.8, label=name if k == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test NLL at the mean")
    ax.set_yscale("log")
    ax.set_title(f"{title}: convergence of the selected runs")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(folder: str) -> str:
    """table.md of a table run, from its results.json: the metrics (mean ± std over the
    seeds) and bSAM's predictive with 1, 8, 32, 64 samples (the paper's Table 4)."""
    with open(os.path.join(folder, "results.json")) as f:
        saved = json.load(f)
    args, results = saved["args"], saved["results"]
    ood = any("ood_auroc" in r["pred"] for r in results.values())
    header = (f"{args['dataset']} / {args['model']}: {saved.get('train_examples', '?')} training examples, "
              f"{args['epochs']} epochs (warm-up {args['warmup_epochs']}), batch {args['batch']}, seeds "
              f"{args['seeds']}, {args['samples']} samples in the sampled predictives; hyperparameters "
              f"{'from ' + args['tuned'] if args.get('tuned') else 'defaults'}")
    text = header + "\n\n" + _markdown_table(results, ood, saved.get("num_classes"))
    text += _verdict_table(verdicts(results, saved.get("num_classes"), ood))
    samples = {m: r["samples"] for m, r in results.items() if r.get("samples")}
    if samples:
        lines = ["| method | samples | accuracy (%) | NLL | ECE |", "|---|---|---|---|---|"]
        for method, by_count in samples.items():
            for count, stats in by_count.items():
                lines.append(f"| {LABELS[method]} | {count} | {_cell(stats['accuracy'], 100.0)} | "
                             f"{_cell(stats['nll'])} | {_cell(stats['ece'])} |")
        text += "\n\nPosterior samples in the predictive:\n\n" + "\n".join(lines)
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text + "\n")
    return text


def _cell(stat: dict, scale: float = 1.0) -> str:
    digits = 2 if scale > 1 else 4
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def diverged(curve: list[float], num_classes: Optional[int]) -> bool:
    """Whether a run diverged, from its NLL curve: the NLL ended not finite, or, after it
    had been better than a uniform prediction's (log(classes)), no better than it. (A run
    too short to beat the uniform prediction has not diverged; an empty curve says nothing.)"""
    if not num_classes or not curve:
        return False
    uniform = 0.99 * math.log(num_classes)
    best = min((v for v in curve if math.isfinite(v)), default=math.inf)
    return not math.isfinite(curve[-1]) or (curve[-1] >= uniform and best < uniform)


def diverged_seeds(curves: list[list[float]], num_classes: Optional[int]) -> int:
    """How many runs diverged by their curves. (A mean and std over such runs says nothing
    about the method; the table says how many there were.)"""
    return sum(diverged(c, num_classes) for c in curves)


def _verdict_table(against: dict) -> str:
    if not against:
        return ""
    keys = list(next(iter(against.values())))
    lines = ["| bSAM against | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |", "|" + "---|" * (len(keys) + 1)]
    lines += [f"| {LABELS[m]} | " + " | ".join(v[k] for k in keys) + " |" for m, v in against.items()]
    return ("\n\nbSAM's predictive against each method (better / worse: the means over the seeds differ by more "
            "than the sum of the two standard deviations; equal: they do not; n/a: a diverged run in either; "
            "undefined: a value that is not finite):\n\n" + "\n".join(lines))


def _metric_keys(ood: bool) -> list[str]:
    return ["accuracy", "nll", "ece", "auroc", "brier"] + (["ood_auroc"] if ood else [])


def verdicts(results: dict, num_classes: Optional[int], ood: bool) -> dict:
    """method -> metric -> "better" / "equal" / "worse" (``metrics.compare``) of bSAM's
    predictive against that method's, or "n/a" where either diverged in a seed (in
    training, or by its test curve); empty without bSAM or with fewer than two seeds."""
    if "bsam" not in results or len(results["bsam"]["pred"]["accuracy"]["runs"]) < 2:
        return {}
    keys = _metric_keys(ood)

    def runs(method):
        return {k: results[method]["pred"][k]["runs"] for k in keys}

    def unstable(method):
        return (results[method].get("diverged_in_training", 0) > 0
                or diverged_seeds(results[method].get("curve_test_nll_at_mean", []), num_classes) > 0)
    out = {}
    for method in results:
        if method == "bsam":
            continue
        if unstable("bsam") or unstable(method):
            out[method] = {k: "n/a" for k in keys}
        else:
            out[method] = metrics.compare(runs("bsam"), runs(method), keys)
    return out


def _markdown_table(results: dict, ood: bool, num_classes: Optional[int] = None) -> str:
    keys = _metric_keys(ood)
    head = "| method | " + " | ".join(METRIC_NAMES[k] for k in keys) + " | ms/step |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for method, r in results.items():
        rows = [(LABELS[method], r["pred"])]
        if method in ("bsam", "bsam_nonoise", "swag", "ivon"):
            rows.append((f"{LABELS[method]} at mean", r["mean"]))
        ms = r["ms_per_step"]
        curves = r.get("curve_test_nll_at_mean", [])
        marks = []
        bad = diverged_seeds(curves, num_classes)
        if bad:
            marks.append(f"diverged: {bad} of {len(curves)} seeds")
        if r.get("diverged_in_training"):
            marks.append(f"diverged in training: {r['diverged_in_training']} of {len(curves)} seeds")
        if r.get("rejected"):
            tried = ", ".join(f"{x['hparams']['lr']:g}" for x in r["rejected"])
            marks.append(f"lr {r['hparams']['lr']:g}: lr {tried} diverged in training")
        rows = [(name + "".join(f" ({mark})" for mark in marks), stats) for name, stats in rows]
        for name, stats in rows:
            cells = [_cell(stats[k], 100.0 if k == "accuracy" else 1.0) for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {ms['mean']:.1f} ± {ms['std']:.1f} |")
    return "\n".join(lines)
