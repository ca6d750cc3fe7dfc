"""Projected featurisation at scale: per-sample gradients projected to d values on the ResNet-style CNN and the
transformer of ``bench_real_models``, as ratios to one plain forward+backward epoch of the same process.

For each model (synthetic data, N samples, batch 128): the plain epoch (best of ``--repeats``), then one pass of
:class:`~deel.influenciae.common.GradientProjector` over the N samples with the Kronecker-factored projection
(``factored=True``) and, on ``--dense-batches`` batches scaled to N, the dense projection (P × d generated block by
block: its cost is ``N · P · d`` multiply-adds, out of reach of a CPU at this scale). A first batch traces the
compiled projection (reported apart, as a one-time cost). Peak RSS increase of each pass.

Usage: ``.venv/bin/python benchmarks/bench_projection.py [--models resnet transformer] [--samples 10000]
[--dim 2048]``.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, str(Path(__file__).resolve().parent))
# pylint: disable=wrong-import-position
from bench_common import plain_step  # noqa: E402
from bench_real_models import LOSS, measure, resnet, synthetic, transformer  # noqa: E402
from deel.influenciae.common import GradientProjector, InfluenceModel  # noqa: E402
# pylint: enable=wrong-import-position


def featurize(projector: GradientProjector, influence_model: Any, dataset: tf.data.Dataset) -> int:
    """Project every batch's per-sample gradients (results dropped); the number of projected values per sample."""
    width = 0
    for batch in dataset:
        width = int(projector.project_batch(influence_model, tuple(batch)).shape[1])
    return width


def run(model_name: str, count: int, dim: int, batch_size: int, repeats: int, dense_batches: int) -> Dict[str, Any]:
    """The rows of one model."""
    model = resnet() if model_name == "resnet" else transformer()
    inputs, labels = synthetic(model_name, count, 1)
    train = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch_size)
    step = plain_step(model, LOSS)

    def epoch():
        for batch_inputs, targets in train:
            step(batch_inputs, targets).numpy()

    epoch()
    baseline = min((measure(epoch) for _ in range(repeats)), key=lambda timing: timing["seconds"])
    influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=LOSS)
    print(f"{model_name}: N = {count}, P = {influence_model.nb_params:,}, batch {batch_size}, d = {dim}; plain epoch "
          f"{baseline['seconds']:.2f} s", flush=True)
    rows = {}
    for name, factored in (("factored", True), ("dense", False)):
        projector = GradientProjector(dim, seed=0, factored=factored)
        warm = measure(lambda projector=projector: featurize(projector, influence_model, train.take(1)))
        if factored:
            timing = measure(lambda projector=projector: featurize(projector, influence_model, train))
        else:
            subset = measure(lambda projector=projector: featurize(projector, influence_model,
                                                                   train.take(dense_batches)))
            timing = {"seconds": subset["seconds"] * count / (dense_batches * batch_size),
                      "peak_mib": subset["peak_mib"], "note": f"scaled from {dense_batches} batches"}
        rows[name] = {"warm_up_seconds": warm["seconds"], **timing, "epochs": timing["seconds"] / baseline["seconds"],
                      "dim": projector.output_dim_for(influence_model, tuple(next(iter(train))))}
        print(f"  {name:9s} projection to d = {rows[name]['dim']}: {timing['seconds']:8.2f} s = "
              f"{rows[name]['epochs']:6.2f} plain epochs, peak +{timing['peak_mib']:.0f} MiB "
              f"(one-time trace {warm['seconds']:.1f} s) {timing.get('note', '')}", flush=True)
    check = min((measure(epoch) for _ in range(repeats)), key=lambda timing: timing["seconds"])
    print(f"  plain epoch again, at the end (machine noise): {check['seconds']:.2f} s", flush=True)
    return {"baseline": baseline, "rows": rows, "check": check}


def main() -> None:
    """Run every model asked for."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["resnet", "transformer"], choices=["resnet", "transformer"])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense-batches", type=int, default=2)
    args = parser.parse_args()
    for model_name in args.models:
        run(model_name, args.samples, args.dim, args.batch_size, args.repeats, args.dense_batches)


if __name__ == "__main__":
    main()
