# The commands people type. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kubetune-installed
BINDIR  = $(shell hack/build-binaries.sh --print-dir)
PYTEST_ARGS ?=

.PHONY: help venv binaries images vllm quickstart demo test test-fast lint fmt generate verify dev-cluster dev-cluster-down bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

venv: ## create .venv with every Python dependency (cached by uv outside the repo)
	@hack/bootstrap-venv.sh

binaries: ## build the cluster's binaries (control plane, kubelet, containerd, CoreDNS, registry, helm ...; cached in ~/.cache/kubetune)
	@hack/build-binaries.sh >/dev/null

images: venv binaries ## build the operator and trainer images (buildah) and push them to the loopback registry
	@hack/images.sh

vllm: venv ## set up vLLM's CPU build in its own environment (cached in ~/.cache/kubetune/vllm; the tests start it)
	@hack/vllm-env.sh

quickstart: venv ## fine-tune a LoRA adapter on CPU on a generated task and show it learned
	$(VENV)/bin/kubetune quickstart

demo: venv binaries images ## the user guide on this machine: cluster, helm install, train on CPU, serve, curl
	@hack/demo.sh

test: venv binaries images vllm lint verify ## everything CI runs: lint, generated files, the whole test suite
	PATH="$(BINDIR):$$PATH" $(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: venv ## unit tests only (no control plane, no S3)
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

lint: venv ## ruff, mypy (operator), hadolint (Dockerfiles)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy operator/kubetune_operator
	@for f in $(wildcard operator/Dockerfile trainer-image/Dockerfile); do echo "hadolint $$f"; $(VENV)/bin/hadolint $$f || exit 1; done

fmt: venv ## format the code
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

generate: venv ## render CRDs, the chart's CRDs and docs/api.md from the typed models
	$(PY) -m kubetune_operator.crdgen write

verify: venv ## fail when generated files are stale (run `make generate`)
	$(PY) -m kubetune_operator.crdgen check

dev-cluster: venv binaries images ## start a local cluster (real node + fake GPU nodes), S3 and the registry in the background (.dev/kubeconfig)
	@$(PY) -m tests.testground up

dev-cluster-down: ## stop what `make dev-cluster` started and tear the node down
	@$(PY) -m tests.testground down

bench: venv binaries ## run the benchmarks (not part of `make test`)
	@for b in bench/*/run.py; do echo "== $$b"; PATH="$(BINDIR):$$PATH" $(PY) $$b || exit 1; done

clean: dev-cluster-down ## remove the virtualenv and local state (the build cache in ~/.cache/kubetune stays)
	rm -rf $(VENV) .dev .pytest_cache .mypy_cache .ruff_cache
