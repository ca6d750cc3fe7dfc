"""The demo's settings, its noisy digits and the figures that score a ranking of the training samples
(:mod:`deel.influenciae.demo` runs it, :mod:`deel.influenciae.demo_report` presents it)."""
from dataclasses import dataclass
from typing import Dict

import numpy as np

from .benchmark.digits import DIGITS_CLASSES, load_digits_split
from .evaluation.mislabel_detection import detection_roc_auc, share_found

NUM_CLASSES = DIGITS_CLASSES
HIDDEN_UNITS = 32
EPOCHS = 100
TRAIN_BATCH_SIZE = 128
LEARNING_RATE = 1e-2
INFLUENCE_BATCH_SIZE = 128
REGULARIZATION = 0.1
TEST_FRACTION = 0.2
SHARES = (0.10, 0.20)
N_GRID = 20
N_EXPLAINED = 3
K_PROPONENTS = 3


@dataclass
class NoisyDigits:
    """Digits split into train and test sets, with some training labels flipped.

    Attributes
    ----------
    x_train, x_test
        Images (N, 8, 8), float32 in [0, 1].
    y_train_true, y_train_given, y_test
        Integer labels (N,); ``y_train_given`` holds the flipped labels the model is trained on.
    flipped
        Sorted positions in the training set of the flipped labels.
    """

    x_train: np.ndarray
    y_train_true: np.ndarray
    y_train_given: np.ndarray
    flipped: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_noisy_digits(seed: int, noise: float, test_fraction: float = TEST_FRACTION) -> NoisyDigits:
    """Load scikit-learn's bundled digits, split them and flip a share of the training labels.

    One generator seeded with ``seed`` draws the split (the test set first,
    :func:`~deel.influenciae.benchmark.digits.load_digits_split`) and then the flips.

    Parameters
    ----------
    seed
        Seed of the split and of the flips.
    noise
        Share of the training labels to flip, in (0, 1); at least one label is flipped.
    test_fraction
        Share of the images kept for the test set.

    Returns
    -------
    NoisyDigits
        Each flipped label differs from the true one (a shift by 1 to 9 classes, drawn uniformly).

    Raises
    ------
    ValueError
        If ``noise`` is outside (0, 1).
    ImportError
        If scikit-learn (which ships the data) is not installed.
    """
    if not 0.0 < noise < 1.0:
        raise ValueError(f"noise must be in (0, 1), got {noise}.")
    rng = np.random.default_rng(seed)
    split = load_digits_split(rng, test_ratio=test_fraction, test_first=True, input_shape=(8, 8))
    y_train_true = split.y_train
    n_flipped = max(int(round(noise * len(y_train_true))), 1)
    flipped = np.sort(rng.choice(len(y_train_true), size=n_flipped, replace=False))
    y_train_given = y_train_true.copy()
    y_train_given[flipped] = (y_train_true[flipped] + rng.integers(1, NUM_CLASSES, size=n_flipped)) % NUM_CLASSES
    return NoisyDigits(split.x_train, y_train_true, y_train_given, flipped, split.x_test, split.y_test)


def share_key(share: float) -> str:
    """The report's key of a share: ``top_10pct`` for 0.10."""
    return f"top_{int(round(100 * share))}pct"


def detection_figures(scores: np.ndarray, is_flipped: np.ndarray) -> Dict[str, float]:
    """Share of flipped labels found in the top 10 % and 20 % of a ranking, and the ROC-AUC."""
    figures = {share_key(share): share_found(scores, is_flipped, share) for share in SHARES}
    figures["roc_auc"] = detection_roc_auc(scores, is_flipped)
    return figures
