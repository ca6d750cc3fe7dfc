"""The measurement subprocess of ``bench_scaling.py``: each method at one point of a sweep, and the ratio table,
printed as tagged JSON records for the driver."""
import json
import os
from typing import Any, Callable, Dict, Optional

import keras
import tensorflow as tf

# pylint cannot see the editable install's namespace package from this folder (no __init__.py here).
from deel.influenciae.common import (ConjugateGradientDescentIHVP,  # pylint: disable=no-name-in-module
                                     ExactIHVP, InfluenceModel)
from deel.influenciae.common.inverse_hessian_vector_product import (  # pylint: disable=no-name-in-module
    DEFAULT_MEMORY_BUDGET_BYTES, estimate_exact_hessian_bytes)
from deel.influenciae.influence import (ArnoldiInfluenceCalculator,  # pylint: disable=no-name-in-module
                                        FirstOrderInfluenceCalculator)
from deel.influenciae.trac_in import TracIn  # pylint: disable=no-name-in-module
from bench_common import PeakMemory, plain_step  # pylint: disable=C0411
from scaling_problems import (ARNOLDI_K, ARNOLDI_SUBSPACE, GIB, INPUT_DIM, N_SWEEP_HIDDEN,  # pylint: disable=C0411
                              REGULARIZATION, RESULT_TAG, TF_OVERHEAD_BYTES, TRACIN_LEARNING_RATE, Problem, batched,
                              build_cnn, build_mlp, current_rss_mib, digits_data, first_then_warm,
                              interleaved_medians, materialize, per_sample_loss, plain_pass, ru_maxrss_mib,
                              streamed_jacobians, timed, train)

# -------- Methods (worker side) ----------------------------------------------------------------------------------
def self_influence(calculator: Any, dataset: tf.data.Dataset) -> tf.Tensor:
    """Self-influence of every sample as one (N,) tensor: the calculators' eager ``self_influence``."""
    return calculator.self_influence(dataset)


def method_psg(problem: Problem, spec: Dict[str, Any]) -> Dict[str, Any]:
    """Streamed per-sample gradients against the plain forward + backward pass (median of warm repeats)."""
    step = plain_step(problem.model, problem.loss_function)
    batches, warm_batches = materialize(problem.train_ds), materialize(problem.warm_ds)
    streamed = streamed_jacobians(problem.influence_model, batches)
    plain = plain_pass(step, batches)
    warmup, _ = timed(lambda: (streamed_jacobians(problem.influence_model, warm_batches)(),
                               plain_pass(step, warm_batches)()))
    with PeakMemory() as memory:
        medians = interleaved_medians({"psg": streamed, "fwd+bwd": plain}, spec["repeats"])
    ratio = medians["psg"] / medians["fwd+bwd"]
    return {"times": medians, "time_s": medians["psg"], "first_s": None, "warmup_s": warmup,
            "d_call_mib": memory.delta_mib, "stored_bytes": 0, "ratio": ratio, "note": f"{ratio:.2f}x fwd+bwd"}


def method_exact(problem: Problem, spec: Dict[str, Any]) -> Dict[str, Any]:
    """ExactIHVP construction + self-influence of all N."""
    im, train_ds = problem.influence_model, problem.train_ds
    try:
        warm_ihvp = ExactIHVP(im, problem.warm_ds, regularization=REGULARIZATION)
    except ValueError as error:
        if "would need" not in str(error):
            raise
        return {"status": "skipped", "note": f"library refused: {str(error).split(' Use ', maxsplit=1)[0]}"}
    warmup, _ = timed(lambda: self_influence(FirstOrderInfluenceCalculator(im, problem.warm_ds,
                                                                           ihvp_calculator=warm_ihvp),
                                             problem.warm_ds))
    with PeakMemory() as memory:
        build, ihvp = first_then_warm(lambda: ExactIHVP(im, train_ds, regularization=REGULARIZATION),
                                      spec["second_call_s"])
        calculator = FirstOrderInfluenceCalculator(im, train_ds, ihvp_calculator=ihvp)
        values, _ = first_then_warm(lambda: self_influence(calculator, train_ds), spec["second_call_s"])
    factorisation = "Cholesky" if ihvp.cholesky_factor is not None else "eigh"
    return {"times": {"build": build["time"], "self": values["time"]}, "time_s": build["time"] + values["time"],
            "first_s": build["first"] + values["first"], "warmup_s": warmup, "d_call_mib": memory.delta_mib,
            "stored_bytes": estimate_exact_hessian_bytes(problem.n_params) + 4 * problem.n_train,
            "note": f"build {build['time']:.2f} s ({factorisation}) + self {values['time']:.2f} s"}


def warm_gradient_kernels(problem: Problem) -> None:
    """Trace the shared per-sample-gradient kernels on every batch shape of the training and test sets.

    CG and Arnoldi compile their Hessian-vector-product loops per instance, so a warm-up instance would not help
    them; a CG warm-up on the small set could even fail where the mean Hessian of a few samples is not positive
    definite after damping.
    """
    problem.influence_model.batch_jacobian(problem.warm_ds)
    problem.influence_model.batch_jacobian(problem.test_ds)


def cg_calculator(problem: Problem, dataset: tf.data.Dataset, iterations: int) -> FirstOrderInfluenceCalculator:
    """First-order calculator on CG with zero tolerances: exactly ``iterations`` CG iterations per solve."""
    ihvp = ConjugateGradientDescentIHVP(problem.influence_model, train_dataset=dataset, n_opt_iters=iterations,
                                        regularization=REGULARIZATION, tol=0.0, atol=0.0)
    return FirstOrderInfluenceCalculator(problem.influence_model, dataset, ihvp_calculator=ihvp)


def stored_guard(stored_bytes: int, spec: Dict[str, Any], what: str) -> Optional[str]:
    """A skip reason when twice ``stored_bytes`` plus TensorFlow's own memory would pass the RSS guard, else None.

    Twice: the per-batch blocks and their concatenation are alive together (the peak measured on CG's pairwise
    path is in ``benchmarks/README.md``).
    """
    if 2 * stored_bytes + TF_OVERHEAD_BYTES <= spec["max_rss_bytes"]:
        return None
    return (f"{what} would need {stored_bytes / GIB:.1f} GiB, twice while concatenated (guard "
            f"{spec['max_rss_bytes'] / GIB:.1f} GiB incl. {TF_OVERHEAD_BYTES / GIB:.0f} GiB for TensorFlow)")


def method_cg(problem: Problem, spec: Dict[str, Any]) -> Dict[str, Any]:
    """CG construction + pairwise matrix (test x train)."""
    # Training gradients are streamed batch by batch (the test side is solved); what stays is the cached model
    # inputs of the Hessian samples, the (N_test, N) result and the (N_test, P) test gradients and solutions.
    stored = 4 * (problem.n_train * (INPUT_DIM + problem.n_test) + 2 * problem.n_test * problem.n_params)
    reason = stored_guard(stored, spec, "the cached inputs and the pairwise matrix")
    if reason:
        return {"status": "skipped", "note": reason, "stored_bytes": stored}
    iterations = spec["cg_iters"]
    warmup, _ = timed(lambda: warm_gradient_kernels(problem))
    with PeakMemory() as memory:
        build, calculator = timed(lambda: cg_calculator(problem, problem.train_ds, iterations))
        pairs, _ = first_then_warm(lambda: calculator.estimate_influence_values_matrix(problem.test_ds,
                                                                                       problem.train_ds),
                                   spec["second_call_s"])
    info = getattr(calculator.ihvp_calculator, "last_solve_info", None) or {}
    solve = {key: int(info[key]) for key in ("iterations", "operator_columns") if key in info}
    done = f"max {iterations} iterations"
    if len(solve) == 2 and solve["operator_columns"]:
        per_column = 1e9 * pairs["time"] / (solve["operator_columns"] * problem.n_train)
        done = (f"{solve['iterations']} iterations, {solve['operator_columns']} HVP columns, "
                f"{per_column:.1f} ns per column and sample")
    return {"times": {"build": build, "pairwise": pairs["time"]}, "time_s": build + pairs["time"],
            "first_s": build + pairs["first"], "warmup_s": warmup, "d_call_mib": memory.delta_mib,
            "stored_bytes": stored, "solve": solve,
            "note": f"{problem.n_test} test vectors, {done}; pairwise {pairs['time']:.2f} s"}


def arnoldi_calculator(problem: Problem, dataset: tf.data.Dataset) -> ArnoldiInfluenceCalculator:
    """Arnoldi calculator with the benchmark's settings."""
    return ArnoldiInfluenceCalculator(problem.influence_model, dataset, subspace_dim=ARNOLDI_SUBSPACE,
                                      force_hermitian=True, k_largest_eig_vals=ARNOLDI_K,
                                      regularization=REGULARIZATION, seed=problem.seed)


def method_arnoldi(problem: Problem, spec: Dict[str, Any]) -> Dict[str, Any]:
    """Arnoldi construction + pairwise matrix (test x train)."""
    if problem.n_params < ARNOLDI_SUBSPACE:
        return {"status": "skipped", "note": f"P < subspace_dim={ARNOLDI_SUBSPACE}"}
    stored = 4 * problem.n_train * (ARNOLDI_K + problem.n_test + INPUT_DIM + 1)
    warmup, _ = timed(lambda: warm_gradient_kernels(problem))
    with PeakMemory() as memory:
        build, calculator = timed(lambda: arnoldi_calculator(problem, problem.train_ds))
        pairs, _ = first_then_warm(lambda: calculator.estimate_influence_values_matrix(problem.test_ds,
                                                                                       problem.train_ds),
                                   spec["second_call_s"])
    return {"times": {"build": build, "pairwise": pairs["time"]}, "time_s": build + pairs["time"],
            "first_s": build + pairs["first"], "warmup_s": warmup, "d_call_mib": memory.delta_mib,
            "stored_bytes": stored, "note": f"build {build:.2f} s + pairwise {pairs['time']:.2f} s"}


def method_tracin(problem: Problem, spec: Dict[str, Any]) -> Dict[str, Any]:
    """TracIn (3 checkpoints): pairwise matrix + self-influence of all N."""
    tracin = TracIn(problem.checkpoints(), TRACIN_LEARNING_RATE)
    stored = 4 * problem.n_test * (int(tracin.nb_params) + problem.n_train)
    warmup, _ = timed(lambda: (self_influence(tracin, problem.warm_ds),
                               tracin.estimate_influence_values_matrix(problem.test_ds, problem.warm_ds)))
    with PeakMemory() as memory:
        values, _ = first_then_warm(lambda: self_influence(tracin, problem.train_ds), spec["second_call_s"])
        pairs, _ = first_then_warm(lambda: tracin.estimate_influence_values_matrix(problem.test_ds,
                                                                                   problem.train_ds),
                                   spec["second_call_s"])
    return {"times": {"pairwise": pairs["time"], "self": values["time"]}, "time_s": pairs["time"] + values["time"],
            "first_s": pairs["first"] + values["first"], "warmup_s": warmup, "d_call_mib": memory.delta_mib,
            "stored_bytes": stored, "note": f"pairwise {pairs['time']:.2f} s + self {values['time']:.2f} s"}


METHOD_FUNCTIONS = {"psg": method_psg, "exact": method_exact, "cg": method_cg, "arnoldi": method_arnoldi,
                    "tracin": method_tracin}


def exact_skip_reason(n_train: int, n_params: int, exact_max_n: int, exact_max_p: int) -> Optional[str]:
    """Why ``exact`` is not run at this size (None: run it). Sizes the library refuses are run to record that."""
    if estimate_exact_hessian_bytes(n_params) > DEFAULT_MEMORY_BUDGET_BYTES:
        return None
    if n_params > exact_max_p:
        return (f"P={n_params} above --exact-max-p={exact_max_p} (O(P^3) float64 factorisation; "
                "tf.linalg.eigh fallback takes minutes here)")
    if n_train > exact_max_n:
        return f"N={n_train} above --exact-max-n={exact_max_n}"
    return None


def emit(record: Dict[str, Any]) -> None:
    """Send one result line to the driver."""
    print(RESULT_TAG + json.dumps(record), flush=True)


def worker_sweep(spec: Dict[str, Any], rss_import_mib: float) -> None:
    """Run the methods of one sweep point and emit one record per method."""
    problem = Problem(spec["hidden"], spec["n"], spec["n_test"], spec["batch_size"], spec["seed"])
    for method in spec["methods"]:
        record = {"sweep": spec["sweep"], "method": method, "n": spec["n"], "p": problem.n_params,
                  "n_test": spec["n_test"], "status": "ok", "load_start": os.getloadavg()[0]}
        reason = exact_skip_reason(spec["n"], problem.n_params, spec["exact_max_n"], spec["exact_max_p"]) \
            if method == "exact" else None
        if reason:
            record.update(status="skipped", note=reason)
        else:
            record["rss_before_mib"] = current_rss_mib()
            try:
                record.update(METHOD_FUNCTIONS[method](problem, spec))
            except Exception as error:  # pylint: disable=broad-exception-caught
                # Keep measuring the other methods of this size; the error is part of the results.
                record.update(status="error", note=f"{type(error).__name__}: {str(error)[:300]}")
        record.update(peak_mib=ru_maxrss_mib(), d_import_mib=ru_maxrss_mib() - rss_import_mib,
                      load_end=os.getloadavg()[0])
        emit(record)


def ratio_functions(influence_model: InfluenceModel, step: Callable, dataset: tf.data.Dataset
                    ) -> Dict[str, Callable[[], Any]]:
    """The passes compared in the ratio table: over pre-materialised batches, over the dataset, and the library's
    ``batch_jacobian(dataset)`` (which also concatenates the (N, P) result)."""
    batches = materialize(dataset)
    return {"psg": streamed_jacobians(influence_model, batches), "fwd+bwd": plain_pass(step, batches),
            "psg tf.data": streamed_jacobians(influence_model, dataset), "fwd+bwd tf.data": plain_pass(step, dataset),
            "batch_jacobian(ds)": lambda: influence_model.batch_jacobian(dataset)}


def worker_ratio(spec: Dict[str, Any]) -> None:
    """Per-sample gradients vs the plain pass on the digits MLP and CNN, at each batch size; one record per row."""
    inputs, labels = digits_data()
    for name in spec["models"]:
        model = build_mlp(N_SWEEP_HIDDEN, spec["seed"]) if name == "mlp" else build_cnn(spec["seed"])
        data = inputs if name == "mlp" else inputs.reshape(-1, 8, 8, 1)
        train(model, data, labels, 5)
        influence_model = InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=per_sample_loss())
        step = plain_step(model, influence_model.loss_function)
        for batch_size in spec["batch_sizes"]:
            functions = ratio_functions(influence_model, step, batched(data, labels, batch_size))
            for function in functions.values():  # warm-up: traces every batch shape
                timed(function)
            medians = interleaved_medians(functions, spec["repeats"])
            emit({"sweep": "ratio", "model": name, "batch_size": batch_size, "n": len(labels),
                  "p": int(influence_model.nb_params), "times": medians, "status": "ok",
                  "ratio": medians["psg"] / medians["fwd+bwd"],
                  "ratio_tf_data": medians["psg tf.data"] / medians["fwd+bwd tf.data"],
                  "ratio_batch_jacobian": medians["batch_jacobian(ds)"] / medians["fwd+bwd tf.data"]})


def worker_main(spec_json: str) -> int:
    """Entry point of a measurement subprocess."""
    rss_import_mib = current_rss_mib()
    spec = json.loads(spec_json)
    keras.utils.set_random_seed(spec["seed"])
    if spec["sweep"] == "ratio":
        worker_ratio(spec)
    else:
        worker_sweep(spec, rss_import_mib)
    return 0
