"""Mislabeled-sample detection metrics against hand-worked examples and scikit-learn's ROC-AUC."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from deel.influenciae.evaluation import detection_area, detection_curve, detection_roc_auc, share_found


def test_curve_worked_example_with_indices_or_mask():
    """Scores rank samples 4, 2, 0, 1, 3; the mislabeled ones are 2 and 3: found after ranks 2 and 5."""
    scores = np.array([3.0, 1.0, 4.0, 0.5, 9.0])
    expected = [0.0, 0.5, 0.5, 0.5, 1.0]
    np.testing.assert_allclose(detection_curve(scores, [2, 3]), expected)
    np.testing.assert_allclose(detection_curve(scores[:, None], np.array([0, 0, 1, 1, 0], bool)), expected)
    assert detection_area(expected) == pytest.approx(0.5)
    assert share_found(scores, [2, 3], 0.4) == pytest.approx(0.5)  # the 2 highest: samples 4 and 2


def test_ties_keep_the_dataset_order():
    scores = np.zeros(4)
    np.testing.assert_allclose(detection_curve(scores, [1]), [0.0, 1.0, 1.0, 1.0])
    assert share_found(scores, [1], 0.25) == 0.0


def test_roc_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=200), 1)  # many ties
    flipped = rng.random(200) < 0.2
    scores[flipped] += 0.5
    assert detection_roc_auc(scores, flipped) == pytest.approx(roc_auc_score(flipped, scores), abs=1e-12)
    with pytest.raises(ValueError, match="both"):
        detection_roc_auc(scores, np.zeros(200, bool))
    with pytest.raises(ValueError, match=r"\[0, 200\)"):
        detection_curve(scores, [200])
