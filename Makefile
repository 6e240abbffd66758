# Every target creates .venv when it is missing, so a clean clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench venv clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m tf_explog.cli demo

# Benchmarks print figures (never pass/fail on time); bench/train_jax.py is run by hand.
bench: $(STAMP)
	$(PY) bench/train_step.py
	$(PY) bench/pipeline.py
	$(PY) bench/fullres.py
	$(PY) bench/batchnorm.py
	$(PY) bench/folding.py
	KERAS_BACKEND=jax $(PY) bench/gpu.py

clean:
	rm -rf $(VENV) build *.egg-info
