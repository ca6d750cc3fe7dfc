"""Query batching for EK-FAC: accuracy and cost of low-rank preconditioned test gradients (``CompressedQueries``).

On the fidelity benchmark's digits MLP (64-64-64-64-10, P = 13,120, trained on its 1,497 training samples), EK-FAC
(empirical Fisher) is fitted once; the preconditioned gradients of the 300 test samples are scored against every
training sample in full (``rank=None``) and compressed to ranks 1 to 32. Reported per rank: Pearson correlation with
the full scores (all pairs), median per-test Spearman, mean overlap of the top-10 proponents, floats held for the
queries and seconds of the score matrix.

Usage: ``.venv/bin/python benchmarks/bench_kfac_queries.py [--regularization 1e-3] [--ranks 1,2,4,8,16,32]``
(``make bench-kfac-queries``); writes ``benchmarks/results/kfac_queries.{md,json}``.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import tensorflow as tf
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity_problems as problems  # noqa: E402  pylint: disable=wrong-import-position

from deel.influenciae.common import BaseInfluenceModel, CompressedQueries, EKFACIHVP  # noqa: E402
import keras  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def top_overlap(scores: np.ndarray, reference: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the reference's top-k training samples found in the top-k of ``scores``, per test row."""
    mine = np.argsort(-scores, axis=1)[:, :k]
    theirs = np.argsort(-reference, axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(mine, theirs)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--regularization", type=float, default=1e-3)
    parser.add_argument("--ranks", default="1,2,4,8,16,32")
    args = parser.parse_args()
    problem = problems.load_problem("mlp")
    model, _ = problems.FastTrainer(problem).train(problem.x_train, problem.y_train, seed=0)
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none")
    influence_model = BaseInfluenceModel(model, model.trainable_variables, loss_function=loss)
    train = tf.data.Dataset.from_tensor_slices((problem.x_train, problem.y_train)).batch(256)
    test = tf.data.Dataset.from_tensor_slices((problem.x_test, problem.y_test)).batch(100)
    solver = EKFACIHVP(influence_model, train, regularization=args.regularization, verbose=False)
    rows: List[Dict[str, float]] = []
    reference = None
    for rank in [None] + [int(value) for value in args.ranks.split(",")]:
        start = time.perf_counter()
        queries = CompressedQueries(solver, test, rank=rank, verbose=False)
        scores = queries.scores(train).numpy()
        seconds = time.perf_counter() - start
        if reference is None:
            reference = scores
        spearman = np.median([stats.spearmanr(a, b)[0] for a, b in zip(scores, reference)])
        rows.append({"rank": "full" if rank is None else rank, "floats": queries.stored_floats, "seconds": seconds,
                     "pearson": float(np.corrcoef(scores.ravel(), reference.ravel())[0, 1]),
                     "median_spearman": float(spearman), "top10_overlap": top_overlap(scores, reference)})
        print(rows[-1], flush=True)
    lines = [f"EK-FAC (empirical Fisher, λ = {args.regularization:g}) on the digits MLP (P = 13,120): 300 test × "
             "1,497 training samples, scores against the full preconditioned gradients.", "",
             "| rank | floats held | seconds | Pearson | median Spearman | top-10 overlap |", "|---|---|---|---|---|---|"]
    lines += [f"| {row['rank']} | {row['floats']:,} | {row['seconds']:.2f} | {row['pearson']:.4f} | "
              f"{row['median_spearman']:.4f} | {row['top10_overlap']:.2f} |" for row in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kfac_queries.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "kfac_queries.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
