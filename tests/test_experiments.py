"""Every experiment command runs end to end (tiny budgets; the real runs are in the README)."""
import json

import pytest

from bsam_fast import demo, experiments, metrics
from bsam_fast.experiments.training import ABLATIONS, METHODS


def test_tune_then_table_on_digits(tmp_path):
    """The tuner (quick grids) and the table from its selections, every method and the
    ablation, two seeds: the smoke test of the whole protocol."""
    tuned = experiments.main(["tune", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch", "32",
                              "--train-subset", "320", "--samples", "2", "--quick", "--out", str(tmp_path),
                              "--no-progress"])
    everyone = set(METHODS + ABLATIONS)
    assert set(tuned["selected"]) == everyone == set(tuned["selected_by_nll"])
    assert tuned["protocol"]["train_examples"] == 288 and tuned["protocol"]["val_examples"] == 32
    for method in everyone:
        trials = tuned["trials"][method]
        assert len(trials) == 2
        best = max(t["val"]["accuracy"] for t in trials)
        assert tuned["selected"][method]["val"]["accuracy"] == best
    assert {t["hparams"]["m"] for t in tuned["trials"]["bsam_nonoise"]} == {8}       # the authors' m
    results = experiments.main(["table", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch", "32",
                                "--train-subset", "320", "--samples", "2", "--seeds", "0", "1",
                                "--sample-counts", "1", "2", "--tuned", str(tmp_path / "tuned.json"),
                                "--out", str(tmp_path), "--no-progress"])
    assert set(results) == everyone
    for method, r in results.items():
        assert r["hparams"] == tuned["selected"][method]["hparams"]
        assert len(r["pred"]["accuracy"]["runs"]) == 2 and r["ms_per_step"]["mean"] > 0
    assert set(results["bsam"]["samples"]) == {"1", "2"}
    table = (tmp_path / "table.md").read_text()
    assert "Posterior samples in the predictive" in table and "| bSAM | 2 |" in table
    assert experiments.main(["report", str(tmp_path)]) == table.rstrip("\n")
    for label in ("| bSAM |", "| bSAM at mean |", "| IVON |", "| SWAG |", "| Laplace (at SGD) |",
                  "| bSAM without noise |", " ± "):
        assert label in table
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_grids_are_the_same_size_for_every_method_and_hold_the_published_region():
    from bsam_fast.experiments.tuning import GRID_SIZE, grid
    for method in METHODS + ABLATIONS:
        for shift in (-1, 0, 2):
            g = grid(method, shift=shift)
            assert len(g) == GRID_SIZE and len({tuple(sorted(c.items())) for c in g}) == GRID_SIZE
        if method in ("sam_sgd", "sam_adam", "bsam", "bsam_nonoise"):
            assert {c["m"] for c in g} == {8}
        assert {c["prior_precision"] for c in grid(method)} == {1.0, 25.0}
    bsam = grid("bsam")        # the bSAM authors': lr 0.25-0.5, rho 0.01-0.1, prior precision 25 (digits: 1)
    assert {0.25, 0.5} <= {c["lr"] for c in bsam} and {c["rho"] for c in bsam} <= {0.01, 0.05, 0.1}
    assert {c["hess_init"] for c in grid("ivon")} == {0.1, 0.5}


def _fake_tune(monkeypatch, best_lr, methods=("bsam",)):
    """tune() with training replaced by a score that peaks at best_lr; returns (result, calls)."""
    import math
    import types
    from bsam_fast.experiments import tuning
    calls = []

    def fake_train(model, cfg, *a, **k):
        calls.append(cfg.hparams["lr"])
        return types.SimpleNamespace(lr=cfg.hparams["lr"], ms_per_step=1.0)

    def fake_evaluate(trained, *a, **k):
        score = -abs(math.log(trained.lr / best_lr))
        return {"pred": {"accuracy": score, "nll": -score}}
    monkeypatch.setattr(tuning, "train", fake_train)
    monkeypatch.setattr(tuning, "evaluate", fake_evaluate)
    monkeypatch.setattr(tuning, "time_steps", lambda *a, **k: 1.0)
    import torch
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    return tuning.tune(x, y, list(methods), lambda: None, epochs=1, batch=8, warmup_epochs=0,
                       log=lambda *_: None), calls


def test_a_selection_at_a_grid_edge_shifts_the_axis_until_it_is_inside(monkeypatch):
    from bsam_fast.experiments.tuning import GRID_SIZE, lr_axis
    result, calls = _fake_tune(monkeypatch, best_lr=4.0)         # past the top of bSAM's 0.125-1.0
    assert result["lr_shift"]["bsam"] == 3 and not result["at_edge"]["bsam"]
    assert result["selected"]["bsam"]["hparams"]["lr"] == 4.0 and 4.0 in lr_axis("bsam", 3)[1:-1]
    assert len(result["grids"]["bsam"]) == GRID_SIZE
    assert len(calls) == GRID_SIZE + 3 * 4        # each shift runs one new lr (x 2 rho x 2 prior precisions)
    result, _ = _fake_tune(monkeypatch, best_lr=1e3)             # too far: stops, says so
    assert result["at_edge"]["bsam"] and result["lr_shift"]["bsam"] == 6
    result, calls = _fake_tune(monkeypatch, best_lr=0.3)         # inside: no shift
    assert result["lr_shift"]["bsam"] == 0 and len(calls) == GRID_SIZE


def test_tune_and_table_resume_from_the_runs_that_finished(tmp_path, monkeypatch):
    """A second call with the same arguments trains nothing; one whose run was lost (an
    interrupted run leaves no record) trains only that run, and the results are the same."""
    from bsam_fast.experiments import table, tuning
    tune_args = ["tune", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch", "32",
                 "--train-subset", "160", "--samples", "2", "--quick", "--methods", "adam", "bsam",
                 "--out", str(tmp_path), "--no-progress"]
    first = experiments.main(tune_args)
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert len(runs) == 4
    trained = []
    real_train = tuning.train
    monkeypatch.setattr(tuning, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    runs[0].unlink()
    second = experiments.main(tune_args)
    assert len(trained) == 1 and second["selected"] == first["selected"]
    table_args = ["table", "--dataset", "digits", "--train-subset", "160", "--samples", "2", "--seeds", "0", "1",
                  "--sample-counts", "1", "--tuned", str(tmp_path / "tuned.json"), "--out", str(tmp_path / "t"),
                  "--no-progress"]
    results = experiments.main(table_args)
    assert len(list((tmp_path / "t" / "runs").glob("*.json"))) == 4
    for r in results.values():
        assert all(len(c) == 1 for c in r["curve_test_nll_at_mean"])       # one epoch, one point
    monkeypatch.setattr(table, "train", lambda *a, **k: pytest.fail("trained again"))
    assert experiments.main(table_args) == results
    assert (tmp_path / "t" / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_bsam_without_noise_takes_both_gradients_at_the_mean():
    """The ablation is bSAM with xi = 0: equal to the optimizer given zero noise."""
    import torch
    from bsam_fast.experiments.training import Config, make_optimizer, _one_step
    from bsam_fast.experiments.models import make_model
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    models = []
    for method in ("bsam_nonoise", "bsam"):
        torch.manual_seed(0)
        model = make_model("mlp", in_features=64)
        opt = make_optimizer(Config(method=method), model, 100)
        if method == "bsam":          # the same, with explicit zero noise
            opt.sample_noise([torch.zeros_like(p) for p in model.parameters()])
            opt.cancel_step()
            zero = [torch.zeros_like(p) for p in model.parameters()]
            opt.step(lambda: (opt.zero_grad(), torch.nn.functional.cross_entropy(model(x), y).backward()), noise=zero)
        else:
            _one_step(Config(method=method), model, opt, [(x, y)])
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_per_method_hyperparameters(tmp_path):
    results = experiments.main(["table", "--dataset", "digits", "--epochs", "1", "--train-subset", "128",
                                "--methods", "bsam", "--set", "bsam.lr=0.2", "bsam.rho=0.02", "--samples", "1",
                                "--seeds", "0", "--out", str(tmp_path), "--no-progress"])
    assert results["bsam"]["hparams"]["lr"] == 0.2 and results["bsam"]["hparams"]["rho"] == 0.02


def test_toy2d_moons_and_rho(tmp_path):
    toy = experiments.main(["toy2d", "--steps", "200", "--out", str(tmp_path / "toy")])
    assert len(toy["std_exact"]) == 2 and all(s > 0 for s in toy["std_bsam"])
    assert (tmp_path / "toy" / "toy2d.png").exists()
    moons = experiments.main(["moons", "--epochs", "2", "--out", str(tmp_path / "moons")])
    assert set(moons) == {"SAM-Adam", "bSAM"}
    curves = experiments.main(["rho", "--dataset", "digits", "--epochs", "1", "--train-subset", "256",
                               "--rhos", "0", "0.05", "--samples", "2", "--out", str(tmp_path / "rho")])
    assert len(curves["bsam"]) == 2 and (tmp_path / "rho" / "rho.png").exists()


def test_missing_cifar_names_the_folder(tmp_path):
    from bsam_fast.experiments.data import DatasetNotFound
    with pytest.raises(DatasetNotFound, match="cifar-10-batches-py"):
        experiments.main(["table", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path)])


def test_demo_prints_the_table_and_one_line(tmp_path, capsys):
    out = demo.main(["--epochs", "1", "--samples", "2", "--seeds", "0", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "(a) exact" in printed and "(b) fast" in printed and "(c) calibrated" in printed
    assert "SAM-Adam" in printed and "bSAM" in printed and "ECE" in printed and " ± " in printed
    assert "In one line: the " in printed and "bSAM's posterior predictive on digits, vs Adam:" in printed
    assert out["max_difference"] < 1e-4               # float32 round-off, not another update
    rows = {(r.layout, r.backend) for r in out["speed"]}
    assert {("resnet20", "reference"), ("resnet20", "adamw_fused"), ("host", "adamw_fused")} <= rows
    assert len(out["runs"]) == 4 and (tmp_path / "reliability.png").exists()
    assert set(out["verdicts"]) == {"Adam", "SAM-Adam"}
    assert all(v in ("better", "equal", "worse") for vs in out["verdicts"].values() for v in vs.values())


def test_demo_reads_the_tuned_hyperparameters():
    tuned = json.loads(open(demo.TUNED).read())
    assert {"adam", "sam_adam", "bsam"} <= set(tuned["selected"])
    assert tuned["protocol"]["dataset"] == "digits" and tuned["protocol"]["grid_size"] == 16


def test_compare_calls_differences_within_the_spread_equal():
    with pytest.raises(ValueError, match="two seeds"):
        metrics.compare({k: [1.0] for k in demo.KEYS}, {k: [1.0] for k in demo.KEYS})
    ours = {"accuracy": [0.9, 0.92], "nll": [0.2, 0.2], "ece": [0.01, 0.05], "auroc": [0.9, 0.9]}
    theirs = {"accuracy": [0.8, 0.81], "nll": [0.3, 0.3], "ece": [0.02, 0.03], "auroc": [0.95, 0.95]}
    assert metrics.compare(ours, theirs) == {"accuracy": "better", "nll": "better", "ece": "equal", "auroc": "worse"}


def test_selection_ranks_diverged_runs_last():
    import math
    from bsam_fast.experiments.tuning import select
    trials = [{"val": {"accuracy": 0.9, "nll": math.nan}}, {"val": {"accuracy": 0.9, "nll": 0.3}},
              {"val": {"accuracy": math.nan, "nll": 0.1}}]
    assert select(trials, "accuracy") is trials[1]
    assert select(trials[:2], "nll") is trials[1]


def test_a_diverged_laplace_run_scores_nan_instead_of_ending_the_process():
    # laplace-torch calls exit() when the Hessian of diverged weights cannot be decomposed;
    # a tuning grid must go on and rank that run last.
    import math
    import torch
    from bsam_fast.experiments import bayes_baselines, training
    pytest.importorskip("laplace")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    assert bayes_baselines.fit_laplace(model, x, y) is None
    trained = training.Trained(model, None, 0.0, None)
    scores = training.evaluate(trained, "laplace", x, y)["pred"]
    assert math.isnan(scores["nll"])


def test_warm_up_then_cosine():
    from bsam_fast.experiments.training import lr_factor
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0 and abs(lr_factor(6, 10, 2) - 0.5) < 1e-12
    assert lr_factor(10, 10, 2) == 0.0 and 0 < lr_factor(9, 10, 2) < 0.05
    assert lr_factor(8, 10, 0, floor=0.1, decay_end=5) == 0.1     # SWAG: constant after decay_end


def test_table_with_tuned_takes_the_tuners_budget_and_refuses_overrides(tmp_path):
    tuned = {"protocol": {"epochs": 1, "batch": 32, "warmup_epochs": 0.0},
             "selected": {"adam": {"hparams": {"lr": 0.01, "prior_precision": 10.0}}}}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(tuned))
    experiments.main(["table", "--dataset", "digits", "--train-subset", "64", "--tuned", str(path), "--seeds", "0",
                      "--out", str(tmp_path), "--no-progress"])
    args = json.loads((tmp_path / "results.json").read_text())["args"]
    assert (args["epochs"], args["batch"], args["warmup_epochs"]) == (1, 32, 0.0)
    with pytest.raises(SystemExit, match="--lr"):
        experiments.main(["table", "--dataset", "digits", "--tuned", str(path), "--lr", "0.1", "--out", str(tmp_path)])


def _synthetic_cifar10(root, per_batch=8, seed=0):
    """A stand-in of CIFAR-10's python-pickle folder: five training batches and a test batch
    of random images, in the format of the real files."""
    import pickle
    import numpy as np
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


@pytest.mark.parametrize("augment", [False, True])
def test_the_cifar10_resnet20_commands_run_on_a_synthetic_folder(tmp_path, augment):
    """The README's CIFAR-10 / ResNet-20-FRN commands (the paper's Tables 1 and 2), on a tiny
    stand-in folder: tune, then the table from its selections."""
    root = _synthetic_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    flags = ["--dataset", "cifar10", "--data-root", str(root), "--model", "resnet20_frn", "--out", str(out),
             "--epochs", "1", "--batch", "8", "--warmup-epochs", "0", "--no-progress"] + (["--augment"] if augment else [])
    experiments.main(["tune", *flags, "--methods", "bsam", "--quick", "--val-fraction", "0.2", "--samples", "2"])
    tuned = json.loads((out / "tuned.json").read_text())
    assert tuned["protocol"].get("augment", False) == augment
    table_flags = [f for f in flags if f not in ("--epochs", "1", "--batch", "8", "--warmup-epochs", "0", "--augment")]
    experiments.main(["table", *table_flags,       # --augment comes from the tuner's protocol
                      "--tuned", str(out / "tuned.json"), "--methods", "bsam", "--seeds", "0", "1", "--samples", "2",
                      "--sample-counts"])
    results = json.loads((out / "results.json").read_text())
    assert results["args"]["augment"] == augment and results["train_examples"] == 40
    assert results["results"]["bsam"]["pred"]["accuracy"]["mean"] >= 0
    specs = [json.loads(p.read_text())["spec"] for p in (out / "runs").glob("bsam-*.json")]
    assert all(s.get("data_factor") == (4.0 if augment else None) for s in specs)


def test_augmentation_crops_and_flips_and_scales_n():
    import torch
    from bsam_fast.experiments import training
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(training.augmented(x, g, pad=0)[0], x[0]) or torch.equal(
        training.augmented(x, torch.Generator().manual_seed(0), pad=0)[0], x[0].flip(-1))
    out = training.augmented(x, torch.Generator().manual_seed(1), pad=2)
    assert out.shape == x.shape
    for img, src in zip(out, x):        # a window of the zero-padded image, maybe mirrored
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        windows = [padded[:, i:i + 4, j:j + 4] for i in range(5) for j in range(5)]
        assert any(torch.equal(img, w) or torch.equal(img, w.flip(-1)) for w in windows)
    cfg = training.Config(method="bsam", epochs=1, batch=4, augment=True, data_factor=4.0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    trained = training.train(model, cfg, torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,)))
    assert trained.opt.param_groups[0]["num_data"] == 32


def test_the_rho_sweep_takes_the_data_settings_and_data_factor_needs_augment(monkeypatch, capsys):
    from bsam_fast.experiments import run
    seen = []

    class Stop(Exception):
        pass

    def first_config(model, cfg, *args, **kwargs):
        seen.append(cfg)
        raise Stop
    monkeypatch.setattr(run, "train", first_config)
    with pytest.raises(Stop):
        experiments.main(["rho", "--dataset", "digits", "--epochs", "1", "--rhos", "0.05", "--augment",
                          "--data-factor", "2", "--batched-parts", "--no-progress"])
    assert seen[0].augment and seen[0].data_factor == 2.0 and seen[0].batched_parts
    with pytest.raises(SystemExit):
        experiments.main(["rho", "--dataset", "digits", "--data-factor", "2"])
    assert "--data-factor" in capsys.readouterr().err


def test_the_table_says_how_many_seeds_diverged(tmp_path):
    """A run whose test NLL at the mean ends not finite, or no better than a uniform
    prediction's after it had been better, is counted and named in table.md; a run too
    short to learn is not."""
    from bsam_fast.experiments.table import diverged_seeds, write_table
    assert diverged_seeds([[0.3, 0.1], [0.2, float("nan")], [0.2, 2.31], [0.2, 2.0], [2.31], [2.4, 2.35]], 10) == 2
    assert diverged_seeds([[0.2, 2.31]], None) == 0
    stat = {"mean": 0.5, "std": 0.1}
    result = {"pred": {k: stat for k in ("accuracy", "nll", "ece", "auroc", "brier")}, "ms_per_step": stat,
              "samples": {}, "curve_test_nll_at_mean": [[0.3, 0.1], [0.4, 30.0], [0.4, float("inf")]]}
    args = {"dataset": "digits", "model": "mlp", "epochs": 2, "warmup_epochs": 0, "batch": 8, "seeds": [0, 1, 2],
            "samples": 2}
    (tmp_path / "results.json").write_text(json.dumps({"args": args, "num_classes": 10,
                                                       "results": {"sgd": result}}))
    assert "| SGD (diverged: 2 of 3 seeds) |" in write_table(str(tmp_path))


def _table_with_unstable_lrs(tmp_path, monkeypatch, accuracy, unstable, test_diverges=()):
    """A table of SGD from a hand-written tuned.json (validation accuracy per lr) whose runs
    diverge in training, in seed 1, at the lrs in `unstable` (their test curves at the lrs
    in `test_diverges`); returns (results, the (lr, seed) runs trained, the table's argv)."""
    from bsam_fast.experiments import table
    grid = [{"lr": lr, "prior_precision": 1.0} for lr in accuracy]
    tuned = {"protocol": {"epochs": 1, "batch": 32, "warmup_epochs": 0.0}, "grids": {"sgd": grid},
             "trials": {"sgd": [{"hparams": c, "val": {"accuracy": accuracy[c["lr"]], "nll": 0.3}} for c in grid]},
             "selected": {"sgd": {"hparams": grid[0]}}}
    (tmp_path / "tuned.json").write_text(json.dumps(tuned))
    trained = []
    real_one_run = table._one_run

    def one_run(args, method, choice, seed, *rest):
        record = real_one_run(args, method, choice, seed, *rest)
        trained.append((choice["lr"], seed))
        if choice["lr"] in unstable and seed == 1:
            record["curve_train_nll_at_mean"] = [1.0, 2.3]
        if choice["lr"] in test_diverges:
            record["curve_test_nll_at_mean"] = [1.0, 2.3]
        return record
    monkeypatch.setattr(table, "_one_run", one_run)
    argv = ["table", "--dataset", "digits", "--train-subset", "64", "--tuned", str(tmp_path / "tuned.json"),
            "--seeds", "0", "1", "2", "--samples", "2", "--sample-counts", "1", "--out", str(tmp_path / "t"),
            "--no-progress"]
    return experiments.main(argv), trained, argv


def test_a_selection_that_diverges_in_training_gives_way_to_the_best_smaller_lr(tmp_path, monkeypatch):
    """The table checks every seed's training NLL: a diverged selection is replaced by the
    tuner's selection among the configurations it trained with smaller learning rates (by
    validation accuracy), again if that one diverges too; a diverged configuration's later seeds are
    not trained, and the table says what happened. A restart replays the same decisions
    from the stored runs without training."""
    from bsam_fast.experiments import table
    accuracy = {0.4: 0.97, 0.2: 0.96, 0.1: 0.95, 0.05: 0.93}
    results, trained, argv = _table_with_unstable_lrs(tmp_path, monkeypatch, accuracy, unstable=(0.4, 0.2))
    # below 0.4 the best is 0.2, below 0.2 it is 0.1
    assert trained == [(0.4, 0), (0.4, 1), (0.2, 0), (0.2, 1), (0.1, 0), (0.1, 1), (0.1, 2)]
    assert results["sgd"]["hparams"]["lr"] == 0.1 and results["sgd"]["diverged_in_training"] == 0
    assert [(r["hparams"]["lr"], r["seed"]) for r in results["sgd"]["rejected"]] == [(0.4, 1), (0.2, 1)]
    text = (tmp_path / "t" / "table.md").read_text()
    assert "| SGD (lr 0.1: lr 0.4, 0.2 diverged in training) |" in text
    monkeypatch.setattr(table, "_one_run", lambda *a: pytest.fail("trained again"))
    assert experiments.main(argv) == results
    assert (tmp_path / "t" / "table.md").read_text() == text


def test_a_selection_diverging_with_no_smaller_lr_left_is_reported_as_diverged(tmp_path, monkeypatch):
    results, trained, _ = _table_with_unstable_lrs(tmp_path, monkeypatch, {0.1: 0.97, 0.05: 0.93},
                                                   unstable=(0.1, 0.05))
    assert trained == [(0.1, 0), (0.1, 1), (0.05, 0), (0.05, 1), (0.05, 2)]
    assert results["sgd"]["hparams"]["lr"] == 0.05 and results["sgd"]["diverged_in_training"] == 1
    assert "| SGD (diverged in training: 1 of 3 seeds) (lr 0.05: lr 0.1 diverged in training) |" in (
        tmp_path / "t" / "table.md").read_text()


def test_a_diverging_test_curve_does_not_move_the_selection(tmp_path, monkeypatch):
    """The rule reads the training curve only: the test set never changes a selection."""
    results, trained, _ = _table_with_unstable_lrs(tmp_path, monkeypatch, {0.1: 0.97, 0.05: 0.93}, unstable=(),
                                                   test_diverges=(0.1,))
    assert trained == [(0.1, 0), (0.1, 1), (0.1, 2)] and results["sgd"]["rejected"] == []


def test_smaller_lr_selection_and_diverged():
    from bsam_fast.experiments.table import diverged, smaller_lr_selection
    grid = [{"lr": 0.1}, {"lr": 0.05}, {"lr": 0.025}]          # 0.025: left behind by an axis shift
    trials = [{"hparams": c, "val": {"accuracy": a, "nll": 0.3}} for c, a in zip(grid, (0.9, 0.8, 0.85))]
    tuned = {"grids": {"sgd": grid[:2]}, "trials": {"sgd": trials}}
    assert smaller_lr_selection(tuned, "sgd", 0.1) == grid[2]
    assert smaller_lr_selection(tuned, "sgd", 0.025) is None
    assert smaller_lr_selection(tuned, "sgd", None) is None and smaller_lr_selection({}, "sgd", 0.1) is None
    assert smaller_lr_selection(None, "sgd", 0.1) is None
    assert diverged([float("nan"), 1.0, 2.3], 10) and diverged([1.0, float("inf")], 10)
    assert not diverged([2.4, 2.35], 10) and not diverged([], 10) and not diverged([1.0, 0.5], 10)


def test_the_table_gives_bsams_verdict_against_each_method(tmp_path):
    """table.md says, per metric, whether bSAM's predictive is better, equal or worse than
    each method's (means apart by more than the two stds), and n/a against a diverged one."""
    from bsam_fast.experiments.table import write_table

    def result(accuracy, nll, curves):
        stat = lambda runs: {"mean": sum(runs) / len(runs), "std": 0.0, "runs": runs}  # noqa: E731
        values = {"accuracy": accuracy, "nll": nll, "ece": [0.01, 0.011], "auroc": [0.9, 0.9], "brier": [0.1, 0.1]}
        pred = {k: stat(v) for k, v in values.items()}
        return {"pred": pred, "mean": pred, "ms_per_step": stat([1.0, 1.0]), "samples": {},
                "curve_test_nll_at_mean": curves}
    ok = [[0.5, 0.2], [0.5, 0.2]]
    results = {"sgd": result([0.90, 0.91], [0.30, 0.31], ok), "bsam": result([0.95, 0.96], [0.30, 0.32], ok),
               "adam": result([0.97, 0.98], [0.2, 0.21], [[0.5, 0.2], [0.5, 2.4]]),
               "sam_adam": result([0.97, 0.98], [0.2, 0.21], ok)}
    args = {"dataset": "digits", "model": "mlp", "epochs": 2, "warmup_epochs": 0, "batch": 8, "seeds": [0, 1],
            "samples": 2}
    (tmp_path / "results.json").write_text(json.dumps({"args": args, "num_classes": 10, "results": results}))
    text = write_table(str(tmp_path))
    assert "| bSAM against | accuracy (%) | NLL | ECE | AUROC | Brier |" in text
    assert "| SGD | better | equal | equal | equal | equal |" in text
    assert "| Adam | n/a | n/a | n/a | n/a | n/a |" in text
    assert "| SAM-Adam | worse | worse | equal | equal | equal |" in text
    results["bsam"]["diverged_in_training"] = 1             # bSAM diverged: no verdict stands
    (tmp_path / "results.json").write_text(json.dumps({"args": args, "num_classes": 10, "results": results}))
    assert "| SGD | n/a | n/a | n/a | n/a | n/a |" in write_table(str(tmp_path))
    args["seeds"] = [0]                                      # one seed: no spread, no verdict
    one = {m: {**r, "pred": {k: {**v, "runs": v["runs"][:1]} for k, v in r["pred"].items()}}
           for m, r in results.items()}
    (tmp_path / "results.json").write_text(json.dumps({"args": args, "num_classes": 10, "results": one}))
    assert "bSAM against" not in write_table(str(tmp_path))
