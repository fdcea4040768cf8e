# wiproxy: `make demo` plays the local story, `make test` is what CI runs.

CARGO        ?= cargo
PYTHON       ?= python3
TOOLS        := .tools
VENV         := $(TOOLS)/venv
KUBE_VALIDATE := $(VENV)/bin/kubernetes-validate
# Oldest Kubernetes with native sidecars on by default, and the newest kubernetes-validate ships.
KUBE_OLDEST  := 1.29.0
WEBHOOK      := target/debug/wiproxy-webhook
OUT          := target/manifests

.PHONY: all build demo test lint unit validate-manifests clean

all: build

build:
	$(CARGO) build --workspace --bins

$(KUBE_VALIDATE):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0

demo: build
	@target/debug/wiproxy-demo

test: lint unit validate-manifests

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The end-to-end tests run the built binaries as separate processes.
unit: build
	$(CARGO) test --workspace

# Every manifest the injection produces must pass the Kubernetes schemas, oldest and newest.
validate-manifests: build $(KUBE_VALIDATE)
	@mkdir -p $(OUT)
	$(WEBHOOK) render -f examples/deployment.yaml --policy-file examples/policy.yaml > $(OUT)/example.yaml
	$(WEBHOOK) render -f $(OUT)/example.yaml --policy-file examples/policy.yaml | cmp - $(OUT)/example.yaml
	$(WEBHOOK) crd > $(OUT)/crd.yaml
	@newest=$$($(KUBE_VALIDATE) --version); \
	for version in $(KUBE_OLDEST) $$newest; do \
	  echo "kubernetes-validate --strict -k $$version: CRD, example and golden outputs"; \
	  $(KUBE_VALIDATE) --strict --quiet -k $$version $(OUT)/crd.yaml $(OUT)/example.yaml webhook/tests/golden/*/output.yaml || exit 1; \
	done
	$(VENV)/bin/python tests/schema/validate_policies.py $(OUT)/crd.yaml examples/policy.yaml webhook/tests/golden/policy.yaml

clean:
	$(CARGO) clean
	rm -rf $(TOOLS)
