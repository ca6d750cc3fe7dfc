"""Does an attribution mean anything? Yardsticks against retraining.

* :func:`linear_datamodeling_score` (LDS) of (T, N) scores against models retrained on random subsets
  (:func:`random_subset_masks`, :func:`retrain_outputs`);
* :func:`leave_one_out_correlation` of scores against models retrained without one sample
  (:func:`leave_one_out_masks`, :func:`retrain_outputs`);
* :func:`lds_noise_ceiling`: how high any LDS can be, from the retraining seeds;
* :func:`select_damping`: the damping λ of a method chosen by LDS or leave-one-out on a validation budget
  (:func:`damping_grid`);
* mislabeled-sample detection: :func:`detection_curve`, :func:`detection_area`, :func:`share_found`,
  :func:`detection_roc_auc`.
"""
from .damping import DampingSelection, damping_grid, select_damping
from .lds import LDSResult, check_lds_inputs, linear_datamodeling_score, random_subset_masks
from .leave_one_out import LeaveOneOutResult, leave_one_out_correlation, leave_one_out_masks
from .noise_ceiling import NoiseCeiling, lds_noise_ceiling
from .mislabel_detection import detection_area, detection_curve, detection_roc_auc, mislabeled_mask, share_found
from .retraining import retrain_outputs

__all__ = ["LDSResult", "check_lds_inputs", "linear_datamodeling_score", "random_subset_masks", "LeaveOneOutResult",
           "leave_one_out_correlation", "leave_one_out_masks", "retrain_outputs", "detection_area", "detection_curve",
           "detection_roc_auc", "mislabeled_mask", "share_found", "DampingSelection", "damping_grid",
           "select_damping", "NoiseCeiling", "lds_noise_ceiling"]
