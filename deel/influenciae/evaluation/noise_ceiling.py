"""How high can any LDS be? The reliability of the retrained outputs themselves, from their seeds.

Retraining is noisy: two models trained on the same subset with different seeds do not give the same outputs, so no
attribution can rank the subsets better than the outputs of one seed rank those of another. With S seeds per subset,
the correlation between two seeds' outputs (per test sample, across subsets: Spearman, as the LDS) estimates the
reliability r₁ of one seed; the mean of S seeds has the Spearman–Brown reliability ``r_S = S r₁ / (1 + (S - 1) r₁)``;
a noiseless predictor correlates with that mean by at most about ``√r_S`` (the noise ceiling).
"""
import dataclasses
import itertools

import numpy as np

from .correlation import finite_array, rowwise_spearman


@dataclasses.dataclass(frozen=True)
class NoiseCeiling:
    """Reliability of seed-averaged retrained outputs.

    Attributes
    ----------
    seed_pair_correlation
        r₁: mean over test samples and seed pairs of the Spearman correlation across subsets between the two
        seeds' outputs.
    reliability
        r_S: the Spearman–Brown reliability of the mean over the S seeds.
    ceiling
        ``√max(r_S, 0)``: about the largest LDS any method can reach against these outputs.
    per_test
        (T,) the seed-pair correlation of each test sample (mean over pairs).
    """

    seed_pair_correlation: float
    reliability: float
    ceiling: float
    per_test: np.ndarray


def lds_noise_ceiling(outputs_per_seed: object) -> NoiseCeiling:
    """The noise ceiling of the LDS from the outputs of every seed.

    Parameters
    ----------
    outputs_per_seed
        (S, M, T) outputs of the model retrained with seed s on subset m, on test sample t (what
        :func:`~deel.influenciae.evaluation.retrain_outputs` returns), S >= 2.

    Returns
    -------
    NoiseCeiling

    Raises
    ------
    ValueError
        On fewer than 2 seeds or 3 subsets, a non-finite output, or a test sample whose outputs do not vary across
        the subsets for some seed.
    """
    outputs = finite_array("outputs_per_seed", outputs_per_seed, 3)
    seeds, subsets, _ = outputs.shape
    if seeds < 2 or subsets < 3:
        raise ValueError(f"outputs_per_seed must hold at least 2 seeds and 3 subsets (S, M, T), got shape "
                         f"{outputs.shape}.")
    constant = np.all(outputs == outputs[:, :1, :], axis=1)  # (S, T)
    if constant.any():
        seed, test = (int(index[0]) for index in np.nonzero(constant))
        raise ValueError(f"outputs_per_seed of seed {seed} are constant across the subsets for test sample {test}.")
    pairs = list(itertools.combinations(range(seeds), 2))
    per_test = np.mean([rowwise_spearman(outputs[first].T, outputs[second].T) for first, second in pairs], axis=0)
    single = float(per_test.mean())
    reliability = seeds * single / (1.0 + (seeds - 1) * single)
    return NoiseCeiling(single, float(reliability), float(np.sqrt(max(reliability, 0.0))), per_test)
