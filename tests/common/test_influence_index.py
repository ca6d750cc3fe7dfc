"""The on-disk influence index ("fit once, query many") against the calculators' in-memory top-k and matrices:
TracIn, first-order influence functions (exact IHVP) and RPS-L2 (tuple vectors); resume after a SIGKILL, corrupted
files, bad arguments, bounded memory."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel.influenciae.common import InfluenceIndex, InfluenceModel
from deel.influenciae.influence import FirstOrderInfluenceCalculator
from deel.influenciae.rps import RepresenterPointL2
from deel.influenciae.trac_in import TracIn
from deel.influenciae.utils import ORDER

N_TRAIN, N_TEST, FEATURES, HIDDEN, CLASSES = 53, 11, 6, 5, 3
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def classifier(seed: int) -> keras.Model:
    """Input(6) -> Dense(5, tanh) -> Dense(3, no bias): logits (RPS needs a bias-free last Dense)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(HIDDEN, activation="tanh"),
                             keras.layers.Dense(CLASSES, use_bias=False)])


def data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    return x, np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, n)]


def cce():
    return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)


def uneven_test_set(x, y):
    """Test batches of sizes 5, 2, 3, 1."""
    first = tf.data.Dataset.from_tensor_slices((x[:7], y[:7])).batch(5)
    return first.concatenate(tf.data.Dataset.from_tensor_slices((x[7:], y[7:])).batch(3))


def tracin(model_a, model_b, rates=(0.1, 0.3)):
    return TracIn([InfluenceModel(model_a, start_layer=-1, loss_function=cce()),
                   InfluenceModel(model_b, start_layer=0, last_layer=1, loss_function=cce())], list(rates))


@pytest.fixture(name="setup", scope="module")
def fixture_setup():
    x_train, y_train = data(N_TRAIN, 1)
    x_test, y_test = data(N_TEST, 2)
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(7)  # 53 = 7 x 7 + 4
    test = uneven_test_set(x_test, y_test)
    model_a, model_b = classifier(0), classifier(3)
    first_order = FirstOrderInfluenceCalculator(InfluenceModel(model_a, start_layer=-1, loss_function=cce()), train,
                                                "exact", regularization=1e-2)
    rps = RepresenterPointL2(model_a, train, None, lambda_regularization=1e-2, epochs=5, surrogate_target="logits",
                             newton_iterations=5)
    calculators = {"tracin": tracin(model_a, model_b), "first_order": first_order, "rps": rps}
    return {"calculators": calculators, "train": train, "test": test, "models": (model_a, model_b),
            "x_train": x_train, "y_train": y_train}


def relative(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# 1-3: the index answers what the calculators answer ----------------------------------------------------
@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_float32_top_k_equals_the_in_memory_top_k(setup, tmp_path, order):
    calculator = setup["calculators"]["tracin"]
    index = calculator.build_index(setup["train"], tmp_path / "index", dtype="float32", shard_size=16)
    assert (index.size, index.shards, index.dtype) == (N_TRAIN, 4, "float32")  # 16 + 16 + 16 + 5 rows
    expected = calculator.influence_top_k(setup["test"], setup["train"], k=6, order=order)
    result = index.top_k(setup["test"], k=6, order=order)
    assert result.samples is None and result.indices.dtype == tf.int64
    assert result.values.shape == (N_TEST, 6) and result.indices.shape == (N_TEST, 6)
    np.testing.assert_array_equal(result.indices.numpy(), expected.indices.numpy())
    np.testing.assert_allclose(result.values.numpy(), expected.values.numpy(), rtol=1e-6,
                               atol=1e-6 * np.abs(expected.values.numpy()).max())


def test_float16_top_k_is_right_to_float16_precision(setup, tmp_path):
    calculator = setup["calculators"]["tracin"]
    index = calculator.build_index(setup["train"], str(tmp_path / "index"), shard_size=16)  # float16 default
    assert index.dtype == "float16"
    matrix = calculator.influence_matrix(setup["test"], setup["train"]).numpy()
    tolerance = 4e-3 * np.abs(matrix).max()
    for order in (ORDER.DESCENDING, ORDER.ASCENDING):
        result = index.top_k(setup["test"], k=5, order=order)
        values, indices = result.values.numpy(), result.indices.numpy()
        np.testing.assert_allclose(values, np.take_along_axis(matrix, indices, 1), atol=tolerance)
        ranking = np.argsort(-matrix if order == ORDER.DESCENDING else matrix, axis=1, kind="stable")
        ranked = np.take_along_axis(matrix, ranking, 1)
        checked = 0
        for row in range(N_TEST):
            for rank in range(5):  # same index wherever the exact value is well separated from its neighbours
                gaps = np.abs(ranked[row, rank] - ranked[row, max(rank - 1, 0):rank + 2])
                if np.sort(gaps)[1] > 4 * tolerance:
                    assert indices[row, rank] == ranking[row, rank]
                    checked += 1
        assert checked > N_TEST * 2


@pytest.mark.parametrize("name", ["tracin", "first_order", "rps"])
def test_every_method_matches_its_matrix_and_top_k(setup, tmp_path, name):
    calculator = setup["calculators"][name]
    index = calculator.build_index(setup["train"], tmp_path / name, dtype="float32", shard_size=10)
    expected = calculator.influence_matrix(setup["test"], setup["train"]).numpy()
    matrix = index.influence_matrix(setup["test"])
    assert matrix.shape == (N_TEST, N_TRAIN)
    assert relative(matrix, expected) < 1e-5
    top = index.top_k(setup["test"], k=4, order=ORDER.DESCENDING)
    np.testing.assert_array_equal(top.indices.numpy(), np.argsort(-expected, axis=1, kind="stable")[:, :4])
    reference = calculator.influence_top_k(setup["test"], setup["train"], k=4)
    np.testing.assert_array_equal(top.indices.numpy(), reference.indices.numpy())
    assert relative(top.values, reference.values) < 1e-5


def test_tuple_vectors_are_stored_per_leaf(setup, tmp_path):
    calculator = setup["calculators"]["rps"]
    index = calculator.build_index(setup["train"], tmp_path / "rps", shard_size=20)
    manifest = json.loads((tmp_path / "rps" / "manifest.json").read_text())
    assert manifest["structure"] == {"tuple": [{"leaf": "vectors0"}, {"leaf": "vectors1"}]}
    assert [(leaf["name"], leaf["shape"], leaf["dtype"]) for leaf in manifest["leaves"]] == [
        ("vectors0", [CLASSES], "float16"), ("vectors1", [HIDDEN], "float16")]
    alpha = np.load(tmp_path / "rps" / "shard_00002.vectors0.npy")
    assert alpha.shape == (13, CLASSES) and alpha.dtype == np.float16
    expected = calculator.influence_matrix(setup["test"], setup["train"]).numpy()
    assert relative(index.influence_matrix(setup["test"]), expected) < 5e-3


def test_manifest_and_properties(setup, tmp_path, capsys):
    calculator = setup["calculators"]["tracin"]
    index = calculator.build_index(setup["train"], tmp_path / "index", dtype="float32", shard_size=25, verbose=True)
    assert "influence index" in capsys.readouterr().out  # the progress bar was shown
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["format"] == "deel-influenciae/influence-index" and manifest["format_version"] == 1
    assert manifest["library_version"] and manifest["complete"] is True and manifest["size"] == N_TRAIN
    assert manifest["configuration"]["calculator"] == "deel.influenciae.trac_in.tracin.TracIn"
    assert [shard["rows"] for shard in manifest["shards"]] == [25, 25, 3]
    assert [shard["first_row"] for shard in manifest["shards"]] == [0, 25, 50]
    assert sorted(os.listdir(tmp_path / "index")) == ["manifest.json", "shard_00000.vectors.npy",
                                                      "shard_00001.vectors.npy", "shard_00002.vectors.npy"]
    assert index.fingerprint == manifest["fingerprint"] and len(index.fingerprint) == 64
    assert index.path == str(tmp_path / "index") and index.shards == 3
    assert "size=53" in repr(index) and "TracIn" in repr(index)
    reopened = InfluenceIndex.load(tmp_path / "index", calculator)
    np.testing.assert_array_equal(reopened.influence_matrix(setup["test"]).numpy(),
                                  index.influence_matrix(setup["test"]).numpy())


# 4: resume ------------------------------------------------------------------------------------------------
class CountingVectors:
    """Counts the training samples whose vectors a calculator computes."""

    def __init__(self, calculator):
        self.original = calculator._compute_influence_vector  # pylint: disable=protected-access
        self.samples = 0

    def __call__(self, batch):
        self.samples += int(batch[0].shape[0])
        return self.original(batch)


def directory_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def test_an_interrupted_build_resumes_byte_identical(setup, tmp_path):
    calculator = setup["calculators"]["tracin"]
    x, y = setup["x_train"], setup["y_train"]

    def failing():
        for position in range(N_TRAIN):
            if position == 37:
                raise RuntimeError("interrupted")
            yield x[position], y[position]

    signature = (tf.TensorSpec((FEATURES,), tf.float32), tf.TensorSpec((CLASSES,), tf.float32))
    broken = tf.data.Dataset.from_generator(failing, output_signature=signature).batch(5)
    with pytest.raises(Exception, match="interrupted"):
        calculator.build_index(broken, tmp_path / "resumed", shard_size=8)
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["complete"] is False and [shard["rows"] for shard in manifest["shards"]] == [8] * 4
    with pytest.raises(ValueError, match="incomplete.*build_index"):
        InfluenceIndex.load(tmp_path / "resumed", calculator)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)  # the batch 30-34 straddles the row 32
    counter = CountingVectors(calculator)
    calculator._compute_influence_vector = counter  # pylint: disable=protected-access
    try:
        index = calculator.build_index(train, tmp_path / "resumed", shard_size=8)
        assert counter.samples == N_TRAIN - 30  # the batches inside the 32 completed rows were not computed
        calculator.build_index(train, tmp_path / "resumed", shard_size=8)  # complete: nothing computed
        assert counter.samples == N_TRAIN - 30
    finally:
        del calculator._compute_influence_vector
    calculator.build_index(train, tmp_path / "whole", shard_size=8)
    assert directory_bytes(tmp_path / "resumed") == directory_bytes(tmp_path / "whole")
    assert index.size == N_TRAIN and index.shards == 7
    # Killed after the last shard's file was renamed, before the manifest listed it, with a temporary file left.
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    manifest["shards"], manifest["complete"], manifest["size"] = manifest["shards"][:-1], False, None
    (tmp_path / "resumed" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "resumed" / ".tmp.shard_00006.vectors.npy.0123").write_bytes(b"partial")
    calculator.build_index(train, tmp_path / "resumed", shard_size=8)
    assert directory_bytes(tmp_path / "resumed") == directory_bytes(tmp_path / "whole")


KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import keras
    import numpy as np
    import tensorflow as tf
    from deel.influenciae.common import InfluenceModel
    from deel.influenciae.trac_in import TracIn

    saved = np.load(sys.argv[2])
    x, y = saved["x"], saved["y"]
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(y.shape[1], use_bias=False)])
    model.set_weights([saved[f"w{i}"] for i in range(3)])
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    kill_at = int(sys.argv[4])

    def samples():
        for position in range(len(x)):
            if position == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield x[position], y[position]

    signature = (tf.TensorSpec(x.shape[1:], tf.float32), tf.TensorSpec(y.shape[1:], tf.float32))
    train = tf.data.Dataset.from_generator(samples, output_signature=signature).batch(3)
    TracIn([InfluenceModel(model, start_layer=-1, loss_function=loss)], 0.5).build_index(
        train, sys.argv[3], dtype="float32", shard_size=8)
    print("not killed")
""")


def test_a_build_killed_by_sigkill_resumes_byte_identical(setup, tmp_path):
    model = setup["models"][0]
    x, y = setup["x_train"], setup["y_train"]
    weights = {f"w{i}": value for i, value in enumerate(model.get_weights())}
    np.savez(tmp_path / "inputs.npz", x=x, y=y, **weights)
    (tmp_path / "build.py").write_text(KILLED_BUILD)
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", OPENBLAS_NUM_THREADS="1")
    process = subprocess.run([sys.executable, str(tmp_path / "build.py"), REPO, str(tmp_path / "inputs.npz"),
                              str(tmp_path / "index"), "40"], env=environment, capture_output=True, timeout=240,
                             check=False)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["complete"] is False and 1 <= len(manifest["shards"]) < 7
    calculator = TracIn([InfluenceModel(model, start_layer=-1, loss_function=cce())], 0.5)
    with pytest.raises(ValueError, match="incomplete"):
        InfluenceIndex.load(tmp_path / "index", calculator)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    resumed = calculator.build_index(train, tmp_path / "index", dtype="float32", shard_size=8)
    calculator.build_index(train, tmp_path / "whole", dtype="float32", shard_size=8)
    assert not [name for name in os.listdir(tmp_path / "index") if name.startswith(".tmp")]
    assert directory_bytes(tmp_path / "index") == directory_bytes(tmp_path / "whole")
    assert resumed.size == N_TRAIN and resumed.shards == 7


# 5: rejections --------------------------------------------------------------------------------------------
@pytest.fixture(name="built")
def fixture_built(setup, tmp_path):
    calculator = setup["calculators"]["tracin"]
    calculator.build_index(setup["train"], tmp_path / "index", shard_size=20)
    return calculator, tmp_path / "index"


def test_a_calculator_of_other_weights_or_settings_is_refused(setup, built):
    calculator, path = built
    model_a, model_b = setup["models"]
    foreign_model = classifier(7)
    with pytest.raises(ValueError, match="another model/method/configuration"):
        InfluenceIndex.load(path, tracin(foreign_model, model_b))
    with pytest.raises(ValueError, match="another model/method/configuration"):
        InfluenceIndex.load(path, setup["calculators"]["rps"])
    with pytest.raises(ValueError, match="another model/method/configuration.*another path"):
        tracin(model_a, foreign_model).build_index(setup["train"], path, shard_size=20)
    assert InfluenceIndex.load(path, tracin(model_a, model_b)).size == N_TRAIN  # same weights: accepted
    with pytest.raises(TypeError, match="calculator"):
        InfluenceIndex.load(path, object())
    assert calculator is not None


def test_corrupted_files_are_named(built):
    calculator, path = built
    shard = path / "shard_00001.vectors.npy"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="shard_00001.vectors.npy.*checksum"):
        InfluenceIndex.load(path, calculator)
    assert InfluenceIndex.load(path, calculator, verify=False).size == N_TRAIN  # sizes and shapes still agree
    shard.write_bytes(original[:-10])
    with pytest.raises(ValueError, match="shard_00001.vectors.npy.*truncated"):
        InfluenceIndex.load(path, calculator, verify=False)
    shard.unlink()
    with pytest.raises(ValueError, match="shard_00001.vectors.npy.*missing"):
        InfluenceIndex.load(path, calculator)
    shard.write_bytes(original)
    assert InfluenceIndex.load(path, calculator).shards == 3
    manifest = path / "manifest.json"
    content = json.loads(manifest.read_text())
    del content["shards"]
    manifest.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="manifest.json.*'shards'"):
        InfluenceIndex.load(path, calculator)
    manifest.write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json.*not valid JSON"):
        InfluenceIndex.load(path, calculator)
    with pytest.raises(ValueError, match="manifest.json.*not valid JSON"):
        calculator.build_index(tf.data.Dataset.from_tensor_slices(([1.0], [1.0])).batch(1), path)
    with pytest.raises(FileNotFoundError, match="No influence index"):
        InfluenceIndex.load(path / "nothing", calculator)


def test_another_dtype_or_shard_size_on_an_existing_index_is_refused(setup, built):
    calculator, path = built
    with pytest.raises(ValueError, match="dtype='float16', not dtype='float32'"):
        calculator.build_index(setup["train"], path, dtype="float32", shard_size=20)
    with pytest.raises(ValueError, match="shard_size=20, not shard_size=10"):
        calculator.build_index(setup["train"], path, shard_size=10)
    assert calculator.build_index(setup["train"], path, shard_size=20).size == N_TRAIN


def test_bad_arguments_are_refused(setup, built, tmp_path):
    calculator, path = built
    train, test = setup["train"], setup["test"]
    with pytest.raises(ValueError, match="dtype must be 'float16' or 'float32'.*int8"):
        calculator.build_index(train, tmp_path / "new", dtype="int8")
    with pytest.raises(ValueError, match="shard_size must be an integer >= 1, got 0"):
        calculator.build_index(train, tmp_path / "new", shard_size=0)
    with pytest.raises(ValueError, match="train_set must be batched"):
        calculator.build_index(train.unbatch(), tmp_path / "new")
    with pytest.raises(TypeError, match="path must be a str"):
        calculator.build_index(train, 3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        calculator.build_index(train, tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an influence index"):
        calculator.build_index(train, tmp_path / "other")
    with pytest.raises(ValueError, match="train_set is empty"):
        calculator.build_index(train.take(0), tmp_path / "empty")
    assert not os.path.exists(tmp_path / "new")
    index = InfluenceIndex.load(path, calculator)
    with pytest.raises(ValueError, match=r"k=54 is larger than the number of training samples \(53\)"):
        index.top_k(test, k=54)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        index.top_k(test, k=0)
    with pytest.raises(TypeError, match="order must be an ORDER member"):
        index.top_k(test, k=2, order="descending")
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        index.top_k(test, k=2, block_size=0)
    with pytest.raises(ValueError, match="test_set must be batched"):
        index.top_k(test.unbatch(), k=2)
    with pytest.raises(ValueError, match="test_set is empty"):
        index.top_k(test.take(0), k=2)


def test_non_finite_vectors_name_the_rows_and_suggest_float32(setup, tmp_path):
    model_a, _ = setup["models"]
    huge = TracIn([InfluenceModel(model_a, start_layer=-1, loss_function=cce())], 1e12)  # vectors ~1e6 x gradients
    with pytest.raises(ValueError, match=r"training rows \[0, 1, .*shard 0.*overflow.*float16.*dtype='float32'"):
        huge.build_index(setup["train"], tmp_path / "half", shard_size=20)
    # Nothing was kept of the failed build (no shard completed): the same path takes the advice.
    assert huge.build_index(setup["train"], tmp_path / "half", dtype="float32", shard_size=20).size == N_TRAIN


# 6: bounded memory ------------------------------------------------------------------------------------------
def test_blocks_and_chunks_smaller_than_a_shard_give_the_same_results(setup, tmp_path):
    calculator = setup["calculators"]["first_order"]
    index = calculator.build_index(setup["train"], tmp_path / "index", dtype="float32", shard_size=16)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert [shard["rows"] for shard in manifest["shards"]] == [16, 16, 16, 5]  # no shard over shard_size rows
    whole = index.top_k(setup["test"], k=3)
    matrix = index.influence_matrix(setup["test"]).numpy()
    for block_size in (1, 3, 7, 100):
        blocked = index.top_k(setup["test"], k=3, block_size=block_size)
        np.testing.assert_array_equal(blocked.indices.numpy(), whole.indices.numpy())
        np.testing.assert_allclose(blocked.values.numpy(), whole.values.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(index.influence_matrix(setup["test"], block_size=block_size).numpy(), matrix,
                                   rtol=1e-5, atol=1e-6 * np.abs(matrix).max())
    seen = []
    estimate = calculator._estimate_influence_value_from_influence_vector  # pylint: disable=protected-access

    def recording(test_side, vectors):
        seen.append((int(test_side.shape[0]), int(vectors.shape[0])))
        return estimate(test_side, vectors)

    budget = calculator.memory_budget_bytes
    calculator._estimate_influence_value_from_influence_vector = recording  # pylint: disable=protected-access
    calculator.memory_budget_bytes = 15 * 4 * 4  # four rows of 15 float32 values: blocks of 4 rows, small chunks
    try:
        chunked = index.top_k(setup["test"], k=3)
        with pytest.raises(ValueError, match="memory_budget_bytes=240.*top_k"):
            index.influence_matrix(setup["test"])
    finally:
        calculator.memory_budget_bytes = budget
        del calculator._estimate_influence_value_from_influence_vector
    assert max(rows for _, rows in seen) == 4 and max(tests for tests, _ in seen) <= 5
    np.testing.assert_array_equal(chunked.indices.numpy(), whole.indices.numpy())
    np.testing.assert_allclose(chunked.values.numpy(), whole.values.numpy(), rtol=1e-5, atol=1e-7)


def test_ties_keep_the_earlier_training_sample(setup, tmp_path):
    calculator = setup["calculators"]["tracin"]
    x, y = setup["x_train"], setup["y_train"]
    repeated = tf.data.Dataset.from_tensor_slices((np.repeat(x[:4], 3, axis=0), np.repeat(y[:4], 3, axis=0))).batch(5)
    index = calculator.build_index(repeated, tmp_path / "index", dtype="float32", shard_size=4)
    result = index.top_k(setup["test"], k=12, block_size=1).indices.numpy()
    for row in result:  # duplicates i, i+1, i+2 have equal values: they come in training order
        for group in range(4):
            positions = [int(np.flatnonzero(row == 3 * group + copy)[0]) for copy in range(3)]
            assert positions == sorted(positions)


def test_a_complete_index_refuses_another_training_set_and_another_loss(tmp_path):
    """The rows of a complete index belong to its training set; the loss is part of the fingerprint."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)).astype(np.float32), rng.integers(0, 3, size=30)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    tracin = TracIn([InfluenceModel(model, start_layer=0, loss_function=loss)], 0.1)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    path = str(tmp_path / "index")
    tracin.build_index(train, path, shard_size=8)
    with pytest.raises(ValueError, match="another training set"):
        tracin.build_index(train.take(2), path, shard_size=8)
    other_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=False, reduction="none")
    other = TracIn([InfluenceModel(model, start_layer=0, loss_function=other_loss)], 0.1)
    with pytest.raises(ValueError, match="another"):
        InfluenceIndex.load(path, other)
    assert InfluenceIndex.load(path, tracin).size == 30
