"""Command line of the benchmark: option parsing and a small end-to-end run on digits."""
import argparse
import csv
import importlib.util
import json
import os

import pytest

from deel.influenciae.benchmark.cli import main, make_factory, parse_args, str2bool
from deel.influenciae.common import ArnoldiConfig, LissaConfig, solver_names
from deel.influenciae.plots import BenchmarkDisplay


@pytest.mark.parametrize("text,expected", [("false", False), ("False", False), ("0", False), ("no", False),
                                           ("true", True), ("1", True), ("YES", True)])
def test_str2bool(text, expected):
    assert str2bool(text) is expected


def test_booleans_and_spellings():
    assert parse_args(["--methods", "tracin", "--use-regu", "false"]).use_regu is False
    assert parse_args(["--methods", "tracin", "--use_regu", "0"]).use_regu is False
    assert parse_args(["--methods", "tracin", "-use_regu", "yes"]).use_regu is True
    assert parse_args(["--methods", "tracin", "--use-regu"]).use_regu is True
    assert parse_args(["--methods", "tracin"]).use_regu is False
    with pytest.raises(SystemExit):
        parse_args(["--methods", "tracin", "--use-regu", "maybe"])


def test_methods_defaults_and_aliases():
    args = parse_args(["--methods", "influence_first_order, loss,tracin", "-method_name", "rps_l2",
                       "--mislabeling_ratio", "0.2", "--start-layer", "-2", "--train-size", "50"])
    assert args.methods == ["first_order", "loss_ranking", "tracin", "rps_l2"]
    assert args.mislabeling_ratio == 0.2 and args.start_layer == -2 and args.take_batch == 50
    assert args.epochs == 100 and args.dataset == "digits" and args.dataset_hessian_size == -1
    cifar = parse_args(["--dataset", "cifar10", "--method-name", "arnoldi", "--epochs-to-save", "1,3"])
    assert cifar.epochs == 60 and cifar.mislabeling_ratio == 0.0005 and cifar.epochs_to_save == [1, 3]
    with pytest.raises(SystemExit):
        parse_args(["--methods", "unknown"])
    with pytest.raises(SystemExit):
        parse_args([])


def test_ihvp_modes_come_from_the_solver_registry():
    for name in solver_names():
        assert parse_args(["--methods", "first_order", "--ihvp-mode", name]).ihvp_mode == name
    assert parse_args(["--methods", "first_order", "--ihvp_mode", "CG"]).ihvp_mode == "cgd"  # an alias
    with pytest.raises(SystemExit):
        parse_args(["--methods", "first_order", "--ihvp-mode", "newton"])
    args = parse_args(["--methods", "first_order,rps_lje", "--ihvp-mode", "arnoldi", "--regularization", "0.01"])
    for method in ("first_order", "rps_lje"):
        config = make_factory(method, args).solver_config()
        assert isinstance(config, ArnoldiConfig) and config.regularization == 0.01
    args = parse_args(["--methods", "first_order", "--ihvp-mode", "lissa", "--n-opt-iters", "7",
                       "--feature-extractor", "-2"])
    assert make_factory("first_order", args).solver_config() == LissaConfig(n_opt_iters=7, damping=1e-4, scale=5.0,
                                                                            extractor_layer=-2)


def test_full_run_on_digits(tmp_path, capsys):
    out = str(tmp_path / "results")
    status = main(["--methods", "loss_ranking,tracin", "--epochs", "3", "--train-size", "120",
                   "--nbr-of-evaluation", "2", "--hidden-units", "16", "--epochs-to-save", "1,2",
                   "--path-to-save", out])
    assert status == 0
    printed = capsys.readouterr().out
    assert "evaluation 2/2" in printed and "detection area" in printed  # progress and table
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        rows = json.load(handle)["results"]
    assert [row["method"] for row in rows] == ["loss_ranking", "tracin"]
    for row in rows:
        assert 0 <= row["area_mean"] <= 1 and len(row["areas"]) == 2 and row["seconds"] > 0
    with open(os.path.join(out, "results.csv"), encoding="utf-8") as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == ["loss_ranking", "tracin"]
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    loaded = BenchmarkDisplay.load_bench_result(out)
    assert set(loaded) == {"loss_ranking", "tracin"} and loaded["tracin"][0].shape == (2, 120)


def test_cifar10_without_data_reports_how_to_get_it(tmp_path, capsys):
    status = main(["--dataset", "cifar10", "--data-path", str(tmp_path), "--methods", "loss",
                   "--path-to-save", str(tmp_path / "out")])
    assert status == 2
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err


def test_type_errors_are_argparse_errors():
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("perhaps")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_missing_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--methods", "loss", "--use-tensorboard"])
    assert "pip install tensorboard" in capsys.readouterr().err
