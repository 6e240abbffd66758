# Every target creates .venv when it is missing, so a clean clone needs nothing else.
# `make demo` installs what the demo needs (the package: TensorFlow, Keras, TensorBoard, ...);
# `make test` adds the test extra (pytest, JAX on CPU, the notebook runner, the gRPC client);
# `make test-fast` runs the same suite without the tests marked slow;
# `make notebook` adds Jupyter and opens examples/quickstart.ipynb.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
TEST := $(VENV)/.installed-test
NOTEBOOK := $(VENV)/.installed-notebook

.PHONY: test test-fast demo notebook bench venv clean

venv: $(BASE)

$(BASE): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(BASE)

$(TEST): $(BASE)
	$(PY) -m pip install -q -e ".[test]"
	touch $(TEST)

$(NOTEBOOK): $(BASE)
	$(PY) -m pip install -q -e ".[notebook]"
	touch $(NOTEBOOK)

test: $(TEST)
	$(PY) -m pytest -q tests

# Everything but the tests marked slow (training runs, subprocesses, installs, JAX, the
# notebook): a few minutes on 2 cores, for the edit-test loop. CI runs `make test`.
test-fast: $(TEST)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(BASE)
	$(PY) -m tf_explog.cli demo

notebook: $(NOTEBOOK)
	$(VENV)/bin/jupyter notebook examples/quickstart.ipynb

# Benchmarks print figures (never pass/fail on time); bench/train_jax.py is run by hand.
bench: $(TEST)
	$(PY) bench/train_step.py
	$(PY) bench/pipeline.py
	$(PY) bench/fullres.py
	$(PY) bench/batchnorm.py
	$(PY) bench/folding.py
	KERAS_BACKEND=jax $(PY) bench/gpu.py
	# needs the brain label maps beside the checkout (../shared/data/brain_label_maps)
	-$(PY) bench/real_anatomy.py

clean:
	rm -rf $(VENV) build *.egg-info
