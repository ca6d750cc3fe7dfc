# Set-up and checks. `make demo` and `make test` each create .venv if missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export TF_CPP_MIN_LOG_LEVEL ?= 2
export MPLBACKEND ?= Agg

.PHONY: demo test lint docs bench-reference bench-peers bench-first-order bench-scaling bench-real-models bench-kfac-scale bench-fidelity bench-kfac bench-kfac-queries bench-projection-peers bench-distribute bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed-base: setup.py $(VENV)/bin/activate
	$(PIP) install --quiet -e ".[demo]"
	touch $@

$(VENV)/.installed-tests: setup.py $(VENV)/bin/activate
	$(PIP) install --quiet -e ".[tests]"
	touch $@ $(VENV)/.installed-base

$(VENV)/.installed-docs: setup.py $(VENV)/bin/activate
	$(PIP) install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

demo: $(VENV)/.installed-base
	$(PY) -m deel.influenciae.demo --output demo_output

test: $(VENV)/.installed-tests
	OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q tests

lint: $(VENV)/.installed-tests
	$(PY) -m pylint --rcfile=.pylintrc deel/influenciae

# Side by side with pyDVL and Captum (own venv, created on first use) and with Influenciae 0.3 (own venv):
# prints the tables and writes benchmarks/results/ (peers.md is the README's performance table).
bench: $(VENV)/.installed-tests
	mkdir -p benchmarks/results
	$(PY) benchmarks/bench_peers.py --rounds 3 --json benchmarks/results/peers.json --markdown benchmarks/results/peers.md
	$(PY) benchmarks/compare_reference.py --json benchmarks/results/reference.json

bench-first-order: $(VENV)/.installed-tests
	$(PY) benchmarks/bench_first_order.py

bench-scaling: $(VENV)/.installed-tests
	$(PY) benchmarks/bench_scaling.py

bench-real-models: $(VENV)/.installed-tests
	$(PY) benchmarks/bench_real_models.py

# K-FAC / EK-FAC fit, self-influence and pairwise influence on the real-models CNN (N = 1k, 10k) and transformer, as
# ratios to a plain epoch: benchmarks/results/kfac_scale.{md,json} (~1 h on 2 cores; `--quick` for N = 1k only).
bench-kfac-scale: $(VENV)/.installed-tests
	$(PY) -u benchmarks/bench_kfac_scale.py

# LDS of every method against retraining, with kronfluence and Captum in their own venv (created or completed on
# first use; without it the peers are skipped): benchmarks/results/fidelity.{md,json,png}; retrainings cached.
bench-fidelity: $(VENV)/.installed-tests
	$(PY) benchmarks/bench_peers.py --setup || echo "peer venv unavailable: the fidelity benchmark runs without peers"
	OPENBLAS_NUM_THREADS=2 $(PY) -u benchmarks/bench_fidelity.py

# K-FAC / EK-FAC side by side with kronfluence (peer venv as for bench-fidelity): agreement of the pairwise scores
# and fit + score seconds; benchmarks/results/kfac.{md,json} (adds the dampings chosen in results/fidelity.json).
bench-kfac: $(VENV)/.installed-tests
	$(PY) benchmarks/bench_peers.py --setup || echo "peer venv unavailable: bench_kfac.py needs it"
	OPENBLAS_NUM_THREADS=1 $(PY) -u benchmarks/bench_kfac.py

# Query batching (CompressedQueries): accuracy, floats held and seconds of rank-r preconditioned test gradients on
# the digits MLP: benchmarks/results/kfac_queries.{md,json} (about a minute).
bench-kfac-queries: $(VENV)/.installed-tests
	OPENBLAS_NUM_THREADS=2 $(PY) -u benchmarks/bench_kfac_queries.py

# TRAK and projected TracIn side by side with traker (CPU BasicProjector) and Captum's TracInCPFastRandProj on the
# fidelity digits MLP, end to end in the same run (peer venv as for bench-fidelity): seconds, ratios, Pearson;
# benchmarks/results/projection_peers.{md,json} (a few minutes).
bench-projection-peers: $(VENV)/.installed-tests
	$(PY) benchmarks/bench_peers.py --setup || echo "peer venv unavailable: bench_projection_peers.py needs it"
	OPENBLAS_NUM_THREADS=2 $(PY) -u benchmarks/bench_projection_peers.py --kind srht --repeats 2

# tf.distribute: per-sample gradients, TracIn self-influence and the EK-FAC fit with 1 replica and with 2
# (MirroredStrategy over the CPU split into 2 logical devices), same results checked; on one machine's shared
# cores this measures the split's overhead: benchmarks/results/distribute.md (~10 min on 2 cores).
bench-distribute: $(VENV)/.installed-tests
	OPENBLAS_NUM_THREADS=1 $(PY) -u benchmarks/bench_distribute.py --models resnet transformer --samples 2000 --repeats 2

bench-reference: $(VENV)/.installed-tests
	$(PY) benchmarks/compare_reference.py

bench-peers: $(VENV)/.installed-tests
	$(PY) benchmarks/bench_peers.py

clean:
	rm -rf $(VENV) demo_output site build *.egg-info
