# Affinity developer commands. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-spark install-ann lock demo test lint proto proto-check bench bench-live quality reliability soak audit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -c requirements.lock
	touch $(STAMP)

install: $(STAMP)

## The optional Spark engine (affinity train --engine spark): pyspark; needs Java 17+.
install-spark: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,spark]' -c requirements.lock

## The optional approximate index for catalogs of a million items and more: faiss.
install-ann: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,ann]' -c requirements.lock

## Re-pin requirements.lock to what is installed now (after editing pyproject.toml).
lock: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	{ sed -n '1,2p' requirements.lock; $(BIN)/pip freeze --exclude-editable | grep -v '^affinity'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

## Generate the gRPC code from protos/ (the one command; CI checks it is up to date).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \
		protos/affinity/v1/recommender.proto

proto-check: $(STAMP)
	$(BIN)/python -m service.protocheck

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy affinity models registry training service
	$(BIN)/python -m service.protocheck
	@if [ -x $(BIN)/hadolint ]; then $(BIN)/hadolint Dockerfile; else echo "hadolint unavailable on this platform; skipped"; fi

test: lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	bash scripts/demo.sh

## Serving benchmark (20k items; see docs/benchmarks.md for the large catalog and training runs).
bench: $(STAMP)
	$(BIN)/python -m bench.serving

## Live events: freshness of the live view, cost of fold-in and recording (~4 min; PostgreSQL too with AFFINITY_TEST_POSTGRES_URI).
bench-live: $(STAMP)
	$(BIN)/python -m bench.live all

## Accuracy on the public protocols (needs ../shared/datasets; writes docs/quality.md).
quality: $(STAMP)
	$(BIN)/python -m bench.quality --protocol all --dataset ml-latest-small --trials 20

## Fault campaigns: swaps under load, worker kill, overload, 10,000-case gRPC fuzzing (~5 min).
reliability: $(STAMP)
	$(BIN)/python -m bench.reliability all

## The bounded soak (at least 10 minutes) at 70% of capacity with periodic swaps.
soak: $(STAMP)
	$(BIN)/python -m bench.reliability soak

## Known-vulnerability audit of the installed dependencies (skips when no advisory data).
audit: $(STAMP)
	bash scripts/audit.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
