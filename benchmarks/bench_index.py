"""The on-disk influence index at a million samples: build, reload, top-10 for 100 test samples; peak RSS and time
against N.

A synthetic calculator whose influence vectors are its inputs (d = 1,024 Gaussian values per sample, generated batch
by batch from a seed: nothing of size N is ever held) stands for the training side of any method; the index stores
them in float16. For each N of ``--sizes`` (default 250,000, 500,000 and 1,000,000) the script builds the index in a
fresh subprocess, then, in another fresh subprocess (its own peak resident memory), reloads it (sha256 of every
shard checked, or not with ``--no-verify``) and answers the top-10 of 100 test samples. It prints the seconds, the
seconds per million rows (constant if the time is linear in N) and the peak RSS of the query process.

Usage: ``.venv/bin/python benchmarks/bench_index.py [--sizes 250000 500000 1000000] [--folder /tmp/index-bench]``.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

from deel.influenciae.common import BaseInfluenceCalculator, InfluenceIndex  # noqa: E402  pylint: disable=C0413

DIM = 1024
BATCH = 4096
TESTS = 100


class SyntheticVectors(BaseInfluenceCalculator):
    """Influence vectors and test side equal to the inputs; values are their inner products."""

    def _compute_influence_vector(self, train_samples: Tuple) -> tf.Tensor:
        return train_samples[0]

    def _preprocess_samples(self, samples: Tuple) -> tf.Tensor:
        return samples[0]

    def _estimate_influence_value_from_influence_vector(self, preproc_test_sample: tf.Tensor,
                                                        influence_vector: tf.Tensor) -> tf.Tensor:
        return tf.matmul(preproc_test_sample, influence_vector, transpose_b=True)

    def _compute_influence_value_from_batch(self, train_samples: Tuple) -> tf.Tensor:
        return tf.reduce_sum(tf.square(train_samples[0]), axis=1, keepdims=True)

    def _index_configuration(self) -> Dict[str, Any]:
        return {"synthetic_dim": DIM}


def synthetic(count: int, seed: int, batch: int = BATCH) -> tf.data.Dataset:
    """``count`` Gaussian vectors of ``DIM`` values (and zero labels), batch i drawn from ``(seed, i)``."""
    def draw(start: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        rows = tf.minimum(tf.constant(batch, tf.int64), count - start)
        values = tf.random.stateless_normal(tf.stack([rows, DIM]), tf.stack([tf.constant(seed, tf.int64), start]))
        return values, tf.zeros(tf.stack([rows]), tf.int32)

    return tf.data.Dataset.range(0, count, batch).map(draw).batch(1).map(
        lambda values, labels: (values[0], labels[0])).prefetch(2)


def peak_rss_mib() -> float:
    """This process's peak resident set size, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(step: str, count: int, folder: str, verify: bool) -> Dict[str, Any]:
    """One step in this process: ``build`` or ``query``."""
    calculator = SyntheticVectors()
    start = time.perf_counter()
    if step == "build":
        index = calculator.build_index(synthetic(count, 0), folder, dtype="float16", shard_size=100_000)
        return {"seconds": time.perf_counter() - start, "size": index.size, "peak_mib": peak_rss_mib()}
    index = InfluenceIndex.load(folder, calculator, verify=verify)
    loaded = time.perf_counter()
    top = index.top_k(synthetic(TESTS, 1, batch=50), k=10)
    values = top.values.numpy()
    return {"load_seconds": loaded - start, "query_seconds": time.perf_counter() - loaded, "size": index.size,
            "peak_mib": peak_rss_mib(), "best": float(values[0, 0]), "shape": list(values.shape)}


def run_child(step: str, count: int, folder: str, verify: bool) -> Dict[str, Any]:
    """:func:`child` in a fresh Python process (its own peak memory)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", step, str(count), folder]
    if not verify:
        command.append("--no-verify")
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode or not lines:
        raise RuntimeError(f"{step} N={count} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    """Build and query an index per size; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    parser.add_argument("--folder", default="/tmp/influenciae-index-bench")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the indexes on disk")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "N", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.child[2], not args.no_verify)))
        return
    print(f"d = {DIM}, float16, top-10 of {TESTS} test samples; load average {os.getloadavg()[0]:.1f}")
    for count in args.sizes:
        folder = str(Path(args.folder) / f"n{count}")
        shutil.rmtree(folder, ignore_errors=True)
        built = run_child("build", count, folder, not args.no_verify)
        queried = run_child("query", count, folder, not args.no_verify)
        per_million = queried["query_seconds"] / count * 1e6
        disk = sum(path.stat().st_size for path in Path(folder).iterdir()) / 2 ** 30
        print(f"N = {count:>9,}: build {built['seconds']:7.1f} s (peak RSS {built['peak_mib']:.0f} MiB), "
              f"{disk:.2f} GiB; load {queried['load_seconds']:5.1f} s, top-10 query {queried['query_seconds']:6.1f} s "
              f"({per_million:.1f} s per million rows), query process peak RSS {queried['peak_mib']:.0f} MiB",
              flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
