"""Label noise of the mislabeled-sample detection benchmark: which training labels are changed, and to what."""
from typing import Tuple

import numpy as np
import tensorflow as tf


def labels_as_numpy(dataset: tf.data.Dataset) -> np.ndarray:
    """The one-hot labels of an unbatched ``(x, y)`` dataset, stacked: (N, C)."""
    parts = list(dataset.map(lambda _, y: y).batch(4096).as_numpy_iterator())
    if not parts:
        raise ValueError("training_dataset is empty.")
    return np.concatenate(parts, axis=0)


def draw_noisy_labels(labels: np.ndarray, mislabeling_ratio: float, rng: np.random.Generator
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Replace a random fraction of one-hot labels by another class drawn uniformly.

    Each sample is mislabeled independently with probability ``mislabeling_ratio``; its new class is drawn
    uniformly among the C - 1 *other* classes, so a mislabeled sample never keeps its class.

    Parameters
    ----------
    labels
        One-hot labels (N, C) (the class is their argmax).
    mislabeling_ratio
        Probability in (0, 1) that a sample is mislabeled.
    rng
        NumPy random generator.

    Returns
    -------
    noisy_labels, noise_indexes
        The new labels (N, C), same dtype as ``labels``, and the sorted indices (M,) of the mislabeled samples.
    """
    labels = np.asarray(labels)
    nb_samples, nb_classes = labels.shape
    if nb_classes < 2:
        raise ValueError("Mislabeling needs at least 2 classes.")
    true_classes = np.argmax(labels, axis=1)
    flipped = rng.uniform(size=nb_samples) < mislabeling_ratio
    offsets = np.floor(rng.uniform(size=nb_samples) * (nb_classes - 1)).astype(np.int64)
    offsets = np.minimum(offsets, nb_classes - 2)
    # Draw among the C - 1 other classes: skip the true class.
    other_classes = offsets + (offsets >= true_classes)
    new_classes = np.where(flipped, other_classes, true_classes)
    noisy = np.eye(nb_classes, dtype=labels.dtype)[new_classes]
    return noisy, np.flatnonzero(flipped)
