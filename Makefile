# The two commands: `make demo` (set up, then run the whole pipeline) and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3
export PATH := $(CURDIR)/$(BIN):$(PATH)
export MLFLOW_ENABLE_TELEMETRY := false
export DO_NOT_TRACK := 1

.PHONY: demo test install system-deps repro lint clean mlflow-server serve

demo: system-deps install repro

install: $(VENV)/.installed

# CPU torch first (a bare `torch` requirement would pull CUDA wheels), then the pinned lock; last,
# uninstall what the lock no longer has (pip never removes), so an old .venv matches CI's fresh one.
# `make install KEEP_EXTRAS=1` only lists those packages. The rule re-runs whenever the lock changes.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	$(BIN)/python scripts/sync_venv.py requirements.lock $(if $(KEEP_EXTRAS),--warn-only)
	touch $@

system-deps:
	PYTHON=$(PYTHON) scripts/install_system_deps.sh

repro:
	dvc repro
	@echo
	@cat metrics/evaluate.md
	@echo
	@$(BIN)/python -c 'import json; d = json.load(open("metrics/promote.json")); print("Promotion:", d["model_name"], "v%s" % d["candidate_version"], "-", d["reason"])'
	@echo "All metrics:        dvc metrics show   (dvc metrics diff main: against the last commit)"
	@echo "Plots:              dvc plots show     (training loss, validation CER, the worst pages drawn)"
	@echo "MLflow UI:          $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns.db --port 5000"
	@echo "EasyOCR bundle:     models/easyocr/ (see models/easyocr/README.md)"
	@echo "Serve the champion: make serve     (HTTP on 127.0.0.1:5001, see docs/pipeline.md)"

test: system-deps install
	$(BIN)/python -m pytest -q

# The tracking server without Docker (docs/gpu-server.md): needs MLFLOW_BACKEND_STORE_URI,
# MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY,
# MLFLOW_AUTH_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY in the environment.
mlflow-server: install
	mlflow/serve.sh

# Serve a logged model over HTTP (docs/pipeline.md): POST {"inputs": ["/path/on/this/machine/page.jpg"]} to
# http://HOST:PORT/invocations. mlflow models serve starts `uvicorn` by name: the PATH exported above finds
# this venv's (run as .venv/bin/mlflow without .venv/bin on PATH, it exits with code 127).
MODEL ?= models:/ko-ocr-recognizer@champion
HOST ?= 127.0.0.1
PORT ?= 5001
serve:
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns.db}" \
	  $(BIN)/mlflow models serve --model-uri '$(MODEL)' --env-manager local --host $(HOST) --port $(PORT)

lint:
	$(BIN)/ruff check --select F,E9 .

clean:
	rm -rf mlruns.db mlartifacts outputs
