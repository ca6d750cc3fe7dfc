"""Two worker processes on localhost under ``MultiWorkerMirroredStrategy`` give the single-device values.

Each worker runs :mod:`tests.distribute.multi_worker_job` with its ``TF_CONFIG`` (ports chosen free at run time);
the single-device reference runs in this process meanwhile. The workers are killed if anything fails."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from tests.distribute.multi_worker_job import compute

REPOSITORY = Path(__file__).resolve().parents[2]
WORKERS = 2
TIMEOUT_SECONDS = 300


def _free_ports(count: int) -> List[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for item in sockets:
            item.bind(("localhost", 0))
        return [item.getsockname()[1] for item in sockets]
    finally:
        for item in sockets:
            item.close()


def _start_workers(tmp_path: Path, arguments: Optional[List[str]] = None) -> List[subprocess.Popen]:
    """Start the workers of a two-worker cluster on localhost; by default each computes the values of
    :func:`compute` into ``tmp_path / worker<i>.npz``."""
    ports = _free_ports(WORKERS)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    workers = []
    for index in range(WORKERS):
        environment = dict(os.environ, OPENBLAS_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2",
                           TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        command = arguments or [os.fspath(tmp_path / f"worker{index}.npz"), os.fspath(tmp_path / "index")]
        workers.append(subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-m", "tests.distribute.multi_worker_job", *command], cwd=REPOSITORY, env=environment, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    return workers


def test_two_workers_equal_single_device(tmp_path):
    workers = _start_workers(tmp_path)
    try:
        reference = compute(None, os.fspath(tmp_path / "single_index"))
        for index, worker in enumerate(workers):
            output, _ = worker.communicate(timeout=TIMEOUT_SECONDS)
            assert worker.returncode == 0, f"worker {index} failed:\n{output[-4000:]}"
            assert '"replicas": 2' in output, output[-2000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for index in range(WORKERS):
        found = np.load(tmp_path / f"worker{index}.npz")
        for name, expected in reference.items():
            if name.startswith("index"):
                continue
            if name.endswith("top_k"):
                np.testing.assert_array_equal(found[name], expected, err_msg=name)
            else:
                scale = float(np.max(np.abs(expected)))
                assert float(np.max(np.abs(found[name] - expected))) <= 1e-5 * scale, name
    chief, other = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert "index_top_k" not in other.files  # only the chief writes (and opens) the index
    np.testing.assert_array_equal(chief["index_top_k"], reference["index_top_k"])
    np.testing.assert_allclose(chief["index_values"], reference["index_values"], rtol=1e-5)


def test_a_worker_lost_during_an_index_build_leaves_complete_shards_and_the_build_resumes(tmp_path):
    """Worker 1 is killed (SIGKILL) when its input reaches sample 14 (of 23, shards of 4 rows): the chief's
    collective times out; the shards written before stay valid and a single-device rerun completes the index with
    the values of an uninterrupted build."""
    # pylint: disable=import-outside-toplevel
    from deel.influenciae.common import InfluenceIndex, InfluenceModel
    from deel.influenciae.trac_in import TracIn
    from tests.distribute.multi_worker_job import problem
    index = tmp_path / "index"
    workers = _start_workers(tmp_path, ["--killed-build", os.fspath(index), "14"])
    try:
        outputs = [worker.communicate(timeout=TIMEOUT_SECONDS)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert workers[1].returncode == -9, outputs[1][-2000:]
    assert workers[0].returncode != 0, outputs[0][-2000:]  # the chief lost its peer
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["complete"] is False and 1 <= len(manifest["shards"]) <= 3, manifest["shards"]
    model, train, test, loss = problem()
    calculator = TracIn([InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)], [0.1])
    rebatched = train.unbatch().batch(3)
    resumed = calculator.build_index(rebatched, os.fspath(index), dtype="float32", shard_size=4)
    whole = calculator.build_index(rebatched, os.fspath(tmp_path / "whole"), dtype="float32", shard_size=4)
    assert resumed.size == whole.size == 23
    np.testing.assert_allclose(resumed.influence_matrix(test).numpy(), whole.influence_matrix(test).numpy(),
                               rtol=1e-5, atol=1e-7)
    assert InfluenceIndex.load(os.fspath(index), calculator).size == 23
