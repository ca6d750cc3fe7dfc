"""Shared numeric assertions of the test suite."""
import numpy as np

from deel.influenciae.utils import ORDER


def assert_close_to_max(actual, expected, tolerance: float = 1e-4) -> None:
    """Same shape, and ``max |actual - expected| <= tolerance · max |expected|`` (errors relative to the scale)."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == np.shape(expected), (actual.shape, np.shape(expected))
    error = np.abs(actual - expected).max()
    assert error <= tolerance * max(np.abs(expected).max(), 1e-12), error


def assert_top_k_from_training_dataset(calculator, train_dataset, inputs: np.ndarray, values: np.ndarray, k: int,
                                       order) -> None:
    """``compute_top_k_from_training_dataset`` agrees with a stable numpy sort of the self-influence ``values`` (N,):
    positions, values and the returned training inputs (``inputs`` (N, ...))."""
    samples, top_values, indices = calculator.compute_top_k_from_training_dataset(train_dataset, k, order,
                                                                                  return_indices=True)
    expected = np.argsort(-values if order == ORDER.DESCENDING else values, kind="stable")[:k]
    np.testing.assert_array_equal(indices.numpy(), expected)
    np.testing.assert_allclose(top_values.numpy(), values[expected], rtol=1e-6)
    np.testing.assert_array_equal(samples.numpy(), inputs[expected])
