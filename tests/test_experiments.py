"""Every experiment command runs end to end (tiny budgets; the real runs are in the README)."""
import json

import pytest

from bsam_fast import demo, experiments
from bsam_fast.experiments.training import METHODS


def test_table_on_digits(tmp_path):
    results = experiments.main(["table", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--batch", "64",
                                "--train-subset", "256", "--samples", "2", "--out", str(tmp_path), "--no-progress"])
    assert set(results) == set(METHODS)
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") == 7          # header + 4 baselines + bSAM twice
    assert "bSAM (S=2)" in table and "bSAM at mean" in table
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert 0.0 <= saved["bsam"]["bma"]["accuracy"] <= 1.0 and saved["bsam"]["ms_per_step"] > 0
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_per_method_hyperparameters(tmp_path):
    results = experiments.main(["table", "--dataset", "digits", "--epochs", "1", "--train-subset", "128",
                                "--methods", "bsam", "--set", "bsam.lr=0.2", "bsam.rho=0.02", "--samples", "1",
                                "--out", str(tmp_path), "--no-progress"])
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


def test_demo_prints_the_table(tmp_path, capsys):
    rows = demo.main(["--epochs", "1", "--samples", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "SAM-Adam" in out and "bSAM" in out and "ECE" in out
    assert len(rows) == 4 and (tmp_path / "reliability.png").exists()
