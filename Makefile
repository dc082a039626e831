# Every target has a "## description"; `make help` lists them. `make test` is exactly what CI runs.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv run test bench image lint fmt check

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

CHECKOV_VENV := $(VENV)/checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null || { echo "Python 3.11 is needed (found: $(PYTHON))"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# checkov pins packaging<24, which pytest 9 cannot run with: it gets a venv of its own.
$(CHECKOV_STAMP): requirements-checkov.txt | $(STAMP)
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-checkov.txt
	touch $(CHECKOV_STAMP)

venv: $(STAMP) ## Create .venv and install the pinned requirements

run: $(STAMP) ## Run web, worker, beat and flower locally (embedded Redis, SQLite); Ctrl-C stops all
	$(PY) -m project.localrun

test: $(STAMP) $(CHECKOV_STAMP) ## Run the test suite (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL are set)
	$(PY) -m pytest

check: $(STAMP) ## Django system checks (includes the broker visibility-timeout check)
	DJANGO_DEBUG=true $(PY) manage.py check

bench: $(STAMP) ## Worker throughput: bare Celery vs this project's bookkeeping (ratios, one run)
	$(PY) -m tests.benchmarks.worker_throughput

IMAGE ?= django-celery-k8s
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' project/__init__.py)
CONTAINER_ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)

image: ## Build the container image (docker, or podman where no Docker engine runs)
	$(CONTAINER_ENGINE) build --build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse HEAD) -t $(IMAGE):$(VERSION) .

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP) ## Format and fix the code with ruff
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
