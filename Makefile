# Every target has a "## description"; `make help` lists them. `make test` is exactly what CI runs.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv run test bench chaos image lint fmt check kind-up kind-down kind-load deploy dev undeploy helm-docs kustomize-base settings-docs test-fast

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

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

# Two processes (pytest-xdist): tests that share one resource (RabbitMQ's queues, the podman image)
# carry the same xdist_group and run in one process. tests/resources.py shares out Redis and ports.
PARALLEL := -n 2 --dist loadgroup

test: $(STAMP) $(CHECKOV_STAMP) ## Run the whole suite in 2 processes (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL are set)
	$(PY) -m pytest $(PARALLEL)

test-fast: $(STAMP) ## Only the tests that start no process, server or container (under a minute)
	$(PY) -m pytest $(PARALLEL) -m "not integration and not container and not subprocess"

check: $(STAMP) ## Django system checks (includes the broker visibility-timeout check)
	DJANGO_DEBUG=true $(PY) manage.py check

BENCH_STAMP := $(VENV)/.installed-bench
# The image's packages alone (requirements.txt): make bench measures start-up and memory with them.
RUNTIME_VENV := $(VENV)/runtime
RUNTIME_STAMP := $(RUNTIME_VENV)/.installed

$(BENCH_STAMP): requirements-bench.txt | $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $(BENCH_STAMP)

$(RUNTIME_STAMP): requirements.txt | $(STAMP)
	test -x $(RUNTIME_VENV)/bin/python || $(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(RUNTIME_STAMP)

bench: $(STAMP) $(BENCH_STAMP) $(RUNTIME_STAMP) ## Throughput vs stock Celery, chord vs group, API vs empty view, start-up, memory, capacity model, probe cost (ratios, one run)
	$(PY) -m tests.benchmarks.run
	$(PY) -m tests.benchmarks.probe_cost

chaos: $(STAMP) ## Chaos runs on a Redis broker and a RabbitMQ node of their own: SIGKILLs, a rolling restart, a broker restart; counts lost and duplicated tasks
	$(PY) -m tests.chaos.run --broker redis
	$(PY) -m tests.chaos.run --broker rabbitmq

IMAGE ?= django-celery-k8s
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' project/__init__.py)
CONTAINER_ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)

image: ## Build the container image (docker, or podman where no Docker engine runs)
	$(CONTAINER_ENGINE) build --build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse HEAD) -t $(IMAGE):$(VERSION) .

# A local cluster (kind, skaffold and helm are the user's; none of them runs where this project is built).
CLUSTER ?= django-celery-k8s

kind-up: ## Create a kind cluster (CLUSTER=django-celery-k8s) from deploy/kind/cluster.yaml
	kind create cluster --config deploy/kind/cluster.yaml --name $(CLUSTER)

kind-down: ## Delete the kind cluster (CLUSTER=django-celery-k8s)
	kind delete cluster --name $(CLUSTER)

kind-load: ## Load the image `make image` built into the kind cluster (for kubectl apply -k without skaffold)
	kind load docker-image $(IMAGE):$(VERSION) --name $(CLUSTER)

deploy: ## Build the image and deploy it to the kind cluster with the Helm chart (skaffold run -p kind)
	skaffold run -p kind

dev: ## Build, deploy and port-forward; rebuild and redeploy on every change (skaffold dev -p kind)
	skaffold dev -p kind

undeploy: ## Delete what deploy or dev installed (skaffold delete)
	skaffold delete

helm-docs: $(STAMP) ## Regenerate the chart README's values table from values.yaml
	$(PY) deploy/helm/django-celery-k8s/generate_readme.py

settings-docs: $(STAMP) ## Regenerate the README's configuration tables and .env.sample from project/environment.py
	$(PY) -m project.environment

kustomize-base: $(STAMP) ## Regenerate deploy/kustomize/base and components/ from the Helm chart
	$(PY) deploy/kustomize/generate_base.py

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP) ## Format and fix the code with ruff
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
