# One target per developer task; CI runs `make test` (see .ci/run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo images test test-unit test-job test-cluster test-e2e lint crds chart-lint kube-score bench clean

# Create or reuse .venv; reinstall when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Trains (or reuses) the digits model and runs examples/requests/digits-gdpr.yaml locally.
demo: $(STAMP)
	$(BIN)/unlearn demo

# The operator and job images (docs/container-images.md): built without a container engine,
# reproducibly, cached by input hash under ~/.cache/unlearning-operator/images.
images: $(STAMP)
	bash images/tools.sh
	$(BIN)/python images/build.py operator job

# Everything CI checks: lint, types, and every test tier against a real control plane,
# the end-to-end tier with pods run from the images.
test: $(STAMP)
	bash images/tools.sh
	bash tests/cluster/build.sh
	bash tests/monitoring/promtool.sh
	bash tests/cluster/build-kube-score.sh
	$(BIN)/python images/build.py operator job
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	bash tests/monitoring/promtool.sh >/dev/null
	$(BIN)/python -m pytest -m "unit"

# The job on real data and models (CPU).
test-job: $(STAMP)
	$(BIN)/python -m pytest -m "job"

# The harness, the operator and the chart against a real control plane.
test-cluster: $(STAMP)
	bash tests/cluster/build.sh >/dev/null
	bash tests/cluster/build-kube-score.sh >/dev/null
	$(BIN)/python -m pytest -m "cluster"

# helm install + kubectl apply through the whole path, pods run from the images.
test-e2e: $(STAMP)
	bash images/tools.sh
	bash tests/cluster/build.sh >/dev/null
	$(BIN)/python -m pytest -m "e2e"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# kube-score on the chart (every values file) and on a Job the operator builds: no CRITICAL but the ignored ones.
kube-score: $(STAMP)
	bash tests/cluster/build.sh >/dev/null
	bash tests/cluster/build-kube-score.sh >/dev/null
	$(BIN)/python -m pytest -q tests/chart/test_kube_score.py

# Regenerate the CRDs from the models (and the chart's copies), and the table of audit numbers in docs/audit-record.md.
crds: $(STAMP)
	$(BIN)/python -m unlearning_operator.crdgen

# helm lint --strict and helm template with every values file under tests/chart/values/.
chart-lint: $(STAMP)
	bash tests/cluster/build.sh >/dev/null
	$(BIN)/python -m pytest -q tests/chart/test_rendered.py tests/chart/test_values.py

# The forgetting-quality tables and plot of docs/benchmarks.md (the wall time is in its generated part).
bench: $(STAMP)
	$(BIN)/python -m bench quality --repeats 2 \
		--out bench/results/quality.json --markdown bench/results/quality.md \
		--plot docs/images/avg-gap-vs-speedup.png --docs docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
