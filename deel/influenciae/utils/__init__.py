"""Small, dependency-free helpers: ranking, nearest neighbours, conjugate gradients, layers and datasets."""
from .backtracking_line_search import BacktrackingLineSearch, BTLSParameters, backtracking_line_search
from .conjugate_gradients import (KrylovBasis, block_conjugate_gradients_solve,
                                  conjugate_gradients_solve)
from .nearest_neighbors import BaseNearestNeighbors, LinearNearestNeighbors
from .sorted_dict import ORDER, BatchSort, stable_top_k
from .tf_operations import (array_to_dataset, assert_batched_dataset, assert_known_cardinality, batch_sizes,
                            dataset_size, dataset_to_tensor, default_process_batch, extract_only_values, find_layer,
                            from_layer_name_to_layer_idx, get_device, is_dataset_batched, map_to_device)
from .model_split import LayerInputCapture, NotSplittableError, split_model, split_model_shared

__all__ = [
    "BacktrackingLineSearch", "BTLSParameters", "backtracking_line_search",
    "conjugate_gradients_solve", "block_conjugate_gradients_solve", "KrylovBasis", "BaseNearestNeighbors",
    "LinearNearestNeighbors", "ORDER", "BatchSort",
    "stable_top_k", "array_to_dataset", "assert_batched_dataset", "assert_known_cardinality", "batch_sizes",
    "dataset_size", "dataset_to_tensor", "default_process_batch", "extract_only_values", "find_layer",
    "from_layer_name_to_layer_idx", "get_device", "is_dataset_batched", "map_to_device", "split_model",
    "split_model_shared", "LayerInputCapture", "NotSplittableError",
]
