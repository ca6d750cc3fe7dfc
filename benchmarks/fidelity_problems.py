"""The two models of the fidelity benchmark, their data, their training recipe and their retrainings.

Both are trained on scikit-learn's 8×8 digits (no download): 1,497 training samples, 300 test samples (the first
100 are the validation budget on which dampings are chosen, the other 200 are reported). Labels are one-hot and the
loss is the categorical cross-entropy on logits; the last layer is ``Dense(10, use_bias=False)`` so that the
representer-point methods apply to the very model every other method sees.

* ``mlp``: ``64 → 64 → 64 → 64 → 10``, ReLU (P = 13,120);
* ``cnn``: ``8×8×1 → Conv2D(8, 3, valid) → Conv2D(16, 3, valid) → Flatten → Dense(32) → 10``, ReLU (P = 9,792).

Training recipe (full model and every retraining): Adam 1e-3, batch 64, 40 epochs, reshuffled each epoch. A seed
sets both the initialisation and the data order. One Keras model and one compiled training step are reused by every
retraining (weights and Adam's moments reset), about 0.5 s per MLP retraining on 2 cores.
"""
import dataclasses
from typing import Callable, Dict, List, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from deel.influenciae.benchmark.digits import build_mlp, load_digits_split

N_TEST = 300
N_VALIDATION = 100
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
CHECKPOINT_EPOCHS = (10, 20, 30, 40)


def build_cnn(seed: int) -> keras.Sequential:
    """The small CNN of the benchmark (valid convolutions, so that its torch twin needs no padding rule)."""
    initializers = keras.initializers
    layers = [keras.Input((8, 8, 1)),
              keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=initializers.GlorotUniform(seed)),
              keras.layers.Conv2D(16, 3, activation="relu", kernel_initializer=initializers.GlorotUniform(seed + 1)),
              keras.layers.Flatten(),
              keras.layers.Dense(32, activation="relu", kernel_initializer=initializers.GlorotUniform(seed + 2)),
              keras.layers.Dense(10, use_bias=False, kernel_initializer=initializers.GlorotUniform(seed + 3))]
    return keras.Sequential(layers)


@dataclasses.dataclass
class FidelityProblem:
    """A model to explain and its data.

    Attributes
    ----------
    name
        ``"mlp"`` or ``"cnn"``.
    build
        ``build(seed)`` -> a fresh, seeded, untrained model.
    x_train, y_train
        (N, ...) float32 inputs, (N, 10) float32 one-hot labels.
    x_test, y_test
        (300, ...) and (300, 10); columns ``[:N_VALIDATION]`` of the outputs are the validation budget.
    """

    name: str
    build: Callable[[int], keras.Model]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def description(self) -> str:
        """One line: architecture and sizes."""
        model = self.build(0)
        shapes = {"mlp": "MLP 64-64-64-64-10", "cnn": "CNN conv8-conv16-dense32-10"}[self.name]
        return (f"{shapes} (P = {model.count_params():,}), digits: {len(self.x_train):,} train, "
                f"{len(self.x_test) - N_VALIDATION} test + {N_VALIDATION} validation")


def load_problem(name: str) -> FidelityProblem:
    """The ``mlp`` or ``cnn`` problem on the seed-0 digits split."""
    if name not in ("mlp", "cnn"):
        raise ValueError(f"Unknown problem {name!r}: expected 'mlp' or 'cnn'.")
    input_shape = (64,) if name == "mlp" else (8, 8, 1)
    split = load_digits_split(0, n_test=N_TEST, test_first=True, input_shape=input_shape)

    def one_hot(labels: np.ndarray) -> np.ndarray:
        return np.eye(10, dtype=np.float32)[np.asarray(labels).astype(np.int64).reshape(-1)] \
            if np.asarray(labels).ndim == 1 else np.asarray(labels, np.float32)

    if name == "mlp":
        def build(seed: int) -> keras.Model:
            return build_mlp(hidden_units=(64, 64, 64), output_bias=False, seed=seed)
    else:
        build = build_cnn
    return FidelityProblem(name, build, split.x_train.astype(np.float32), one_hot(split.y_train),
                           split.x_test.astype(np.float32), one_hot(split.y_test))


class FastTrainer:
    """Trains one reused model with the benchmark's recipe; compiled once, reset between runs."""

    def __init__(self, problem: FidelityProblem):
        self.problem = problem
        self.model = problem.build(0)
        self.loss = keras.losses.CategoricalCrossentropy(from_logits=True)
        self.optimizer = keras.optimizers.Adam(LEARNING_RATE)
        self.optimizer.build(self.model.trainable_variables)
        self._initial: Dict[int, List[np.ndarray]] = {}
        self._moments = [variable for variable in self.optimizer.variables
                         if variable.path not in (self.optimizer.iterations.path,
                                                  self.optimizer.learning_rate.path)]
        model, loss, optimizer = self.model, self.loss, self.optimizer

        @tf.function(jit_compile=False, reduce_retracing=True)
        def step(inputs: tf.Tensor, labels: tf.Tensor) -> None:
            with tf.GradientTape() as tape:
                value = loss(labels, model(inputs, training=True))
            optimizer.apply_gradients(zip(tape.gradient(value, model.trainable_variables),
                                          model.trainable_variables))

        self._step = step

    def initial_weights(self, seed: int) -> List[np.ndarray]:
        """The seeded initialisation (built once per seed)."""
        if seed not in self._initial:
            self._initial[seed] = self.problem.build(seed).get_weights()
        return self._initial[seed]

    def train(self, x: np.ndarray, y: np.ndarray, seed: int,
              checkpoint_epochs: Sequence[int] = ()) -> Tuple[keras.Model, List[List[np.ndarray]]]:
        """Train from the seed's initialisation; returns the model and the weights at ``checkpoint_epochs``."""
        self.model.set_weights(self.initial_weights(seed))
        for variable in self._moments:
            variable.assign(tf.zeros_like(variable))
        self.optimizer.iterations.assign(0)
        rng = np.random.default_rng(seed)
        inputs, labels = tf.constant(x), tf.constant(y)
        checkpoints = []
        for epoch in range(1, EPOCHS + 1):
            order = rng.permutation(len(x))
            for start in range(0, len(x), BATCH_SIZE):
                batch = tf.constant(order[start:start + BATCH_SIZE])
                self._step(tf.gather(inputs, batch), tf.gather(labels, batch))
            if epoch in checkpoint_epochs:
                checkpoints.append(self.model.get_weights())
        return self.model, checkpoints

    def train_on_subset(self, subset: tf.data.Dataset, seed: int) -> keras.Model:
        """``train_fn`` of :func:`~deel.influenciae.evaluation.retrain_outputs`: an unbatched subset."""
        x, y = next(iter(subset.batch(len(self.problem.x_train))))
        return self.train(x.numpy(), y.numpy(), seed)[0]

    def test_outputs(self, model: keras.Model) -> np.ndarray:
        """``measure_fn``: minus the cross-entropy of every test sample, (300,) (larger = better)."""
        logits = model(self.problem.x_test, training=False)
        losses = keras.losses.categorical_crossentropy(self.problem.y_test, logits, from_logits=True)
        return -np.asarray(losses, dtype=np.float64)
