"""Progress bars and logging: shown only when asked (or in interactive sessions), never changing results."""
import logging

import numpy as np

from deel.influenciae.common import ConjugateGradientDescentIHVP, InfluenceModel
from deel.influenciae.influence import FirstOrderInfluenceCalculator
from deel.influenciae.utils.progress import interactive, progress_bar, resolve_verbose
from tests.toy_models import toy_data, toy_dataset, toy_model, toy_mse


def test_progress_bar_yields_every_item_and_prints_only_when_verbose(capsys):
    assert list(progress_bar(iter(range(5)), 5, "counting", verbose=False)) == list(range(5))
    assert capsys.readouterr().out == ""
    assert list(progress_bar(iter(range(5)), None, "counting", verbose=True)) == list(range(5))
    printed = capsys.readouterr().out
    assert "counting" in printed and "5/Unknown" in printed


def test_default_is_off_under_pytest():
    assert not interactive()
    assert resolve_verbose(None) is False and resolve_verbose(True) is True


def test_self_influence_with_a_progress_bar_gives_the_same_values(capsys):
    model = toy_model()
    x, y = toy_data(12)
    train = toy_dataset(x, y, 5)
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=toy_mse())
    calculator = FirstOrderInfluenceCalculator(influence_model, train, "exact")
    quiet = calculator._compute_influence_values(train).numpy()  # pylint: disable=protected-access
    calculator.verbose = True
    shown = calculator._compute_influence_values(train).numpy()  # pylint: disable=protected-access
    np.testing.assert_array_equal(quiet, shown)
    assert "self-influence" in capsys.readouterr().out


def test_conjugate_gradients_log_iterations_and_residuals(caplog):
    model = toy_model()
    x, y = toy_data(12)
    train = toy_dataset(x, y, 5)
    influence_model = InfluenceModel(model, start_layer=-1, loss_function=toy_mse())
    solver = ConjugateGradientDescentIHVP(influence_model, None, train)
    with caplog.at_level(logging.INFO, logger="deel.influenciae"):
        solver.apply_inverse(np.ones((2, 3), np.float32))
    assert any("Block CG" in record.getMessage() and "residual" in record.getMessage() for record in caplog.records)
