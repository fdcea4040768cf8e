#!/usr/bin/env bash
# make e2e-gke-test: `make e2e-gke DRY_RUN=1` against stub gcloud, kubectl, helm and skopeo that
# record every call and answer like the real tools would. Checks the recorded sequence against
# e2e/expected-calls.txt (GKE Standard, new cluster), then Autopilot, an existing cluster, and a
# failing assertion (exit status non-zero, everything still torn down).
# UPDATE_EXPECTED=1 rewrites e2e/expected-calls.txt from the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
make=${MAKE:-make}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/tmp"
cat > "$work/bin/stub" <<'STUB'
#!/usr/bin/env bash
# Records "TOOL ARGS..." and answers as the real tool would in the passing scenario, unless
# STUB_SIDECAR_STATUS says otherwise.
tool=$(basename "$0")
echo "$tool $*" >> "$STUB_LOG"
args=" $* "
case "$tool $args" in
  "gcloud  functions describe "*) echo "https://europe-west1-host-proj.cloudfunctions.net/orders-test" ;;
  "gcloud  run services describe "*) echo "https://inventory-test-abc123-ew.a.run.app" ;;
  "gcloud  projects describe "*) echo "123456789012" ;;
  "gcloud  auth print-access-token "*) echo "ya29.stub-token" ;;
  "skopeo  login "*) [ "$(cat)" = ya29.stub-token ] || { echo "stub: skopeo login got no token on standard input" >&2; exit 3; } ;;
  "kubectl  get namespace "*) echo 'Error from server (NotFound): namespaces "payments" not found' >&2; exit 1 ;;
  "kubectl  apply -f "*forbidden.yaml*)
    file=${args##* -f }; file=${file%% *}
    grep -q 'wiproxy.io/service-account: forbidden@client-proj.iam.gserviceaccount.com' "$file" || { echo "stub: no forbidden GSA in $file" >&2; exit 3; }
    grep -q '^kind: Deployment' "$file" && ! grep -q '^kind: Namespace' "$file" || { echo "stub: $file is not the Deployment alone" >&2; exit 3; }
    echo 'Error from server: error when creating "forbidden.yaml": admission webhook "validate.wiproxy.io" denied the request: Google service account forbidden@client-proj.iam.gserviceaccount.com is not allowed in namespace payments by TokenProxyPolicy e2e' >&2
    exit 1 ;;
  "kubectl  apply -f "*)
    file=${args##* -f }; file=${file%% *}
    grep -q 'wiproxy.io/upstreams: "orders=https://europe-west1-host-proj.cloudfunctions.net/orders-test,inventory=https://inventory-test-abc123-ew.a.run.app;header=x-serverless-authorization"' "$file" \
      || { echo "stub: the example in $file does not point at the function" >&2; exit 3; } ;;
  "kubectl  exec "*cloudfunctions.net*) printf 401 ;;
  "kubectl  exec "*WIPROXY_*_URL*) printf '%s' "${STUB_SIDECAR_STATUS:-200}" ;;
  "kubectl  get events "*) echo 'Google service account wiproxy-e2e-test@client-proj.iam.gserviceaccount.com is not allowed in namespace payments by TokenProxyPolicy e2e' ;;
esac
exit 0
STUB
chmod +x "$work/bin/stub"
for tool in gcloud kubectl helm skopeo; do ln -s stub "$work/bin/$tool"; done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# run NAME [MAKE VARIABLES...]: make e2e-gke DRY_RUN=1 with the stubs first on PATH; the recorded
# calls, with the temporary paths and the version made stable, go to $work/NAME.calls.
run() {
  local name=$1; shift
  : > "$work/$name.log"
  set +e
  STUB_LOG="$work/$name.log" PATH="$work/bin:$PATH" TMPDIR="$work/tmp" RUN_ID=test \
    "$make" -s --no-print-directory e2e-gke DRY_RUN=1 PROJECT=client-proj REGION=europe-west1 "$@" \
    > "$work/$name.out" 2>&1
  status=$?
  set -e
  sed -E -e "s|$work/tmp/tmp\.[A-Za-z0-9]+|<work>|g" -e "s|oci-archive:[^ ]*/([a-z-]+\.oci\.tar)|oci-archive:<images>/\1|g" \
    -e "s|:$version\b|:<version>|g" "$work/$name.log" > "$work/$name.calls"
}
fail() { echo "e2e-gke-test FAILED: $*" >&2; exit 1; }

run standard HOST_PROJECT=host-proj
[ "$status" = 0 ] || { cat "$work/standard.out"; fail "the dry run exited $status"; }
if [ -n "${UPDATE_EXPECTED:-}" ]; then cp "$work/standard.calls" e2e/expected-calls.txt; fi
if ! diff -u e2e/expected-calls.txt "$work/standard.calls"; then
  fail "the recorded calls differ from e2e/expected-calls.txt (UPDATE_EXPECTED=1 rewrites it)"
fi
grep -q '^e2e-gke passed$' "$work/standard.out" || fail "no pass line"
echo "standard: $(wc -l < "$work/standard.calls") calls in the expected order"

run autopilot AUTOPILOT=1
[ "$status" = 0 ] || { cat "$work/autopilot.out"; fail "the Autopilot dry run exited $status"; }
grep -q '^gcloud container clusters create-auto wiproxy-e2e-test ' "$work/autopilot.calls" || fail "Autopilot: no create-auto"
! grep -q 'workload-pool' "$work/autopilot.calls" || fail "Autopilot: --workload-pool given"
grep -q 'functions deploy orders-test --gen2 --project client-proj ' "$work/autopilot.calls" || fail "HOST_PROJECT should default to PROJECT"
echo "autopilot: create-auto, host project defaults to the client project"

run existing CLUSTER=shared-cluster
[ "$status" = 0 ] || { cat "$work/existing.out"; fail "the existing-cluster dry run exited $status"; }
! grep -Eq '^gcloud container clusters (create|create-auto|delete) ' "$work/existing.calls" || fail "CLUSTER=: a cluster was created or deleted"
grep -q '^gcloud container clusters get-credentials shared-cluster ' "$work/existing.calls" || fail "CLUSTER=: no credentials for it"
grep -q '^helm uninstall wiproxy ' "$work/existing.calls" || fail "CLUSTER=: the chart was not uninstalled"
echo "existing cluster: used, not created or deleted; the chart still uninstalled"

STUB_SIDECAR_STATUS=503 run failing HOST_PROJECT=host-proj
[ "$status" != 0 ] || fail "a sidecar answering 503 passed"
grep -q 'answered 503, not 200' "$work/failing.out" || { cat "$work/failing.out"; fail "the failure does not say why"; }
! grep -q 'forbidden.yaml' "$work/failing.calls" || fail "it went on after a failed assertion"
for teardown in 'gcloud container clusters delete wiproxy-e2e-test' 'gcloud functions delete orders-test' \
  'gcloud run services delete inventory-test' 'gcloud iam service-accounts delete' \
  'gcloud artifacts repositories delete wiproxy-e2e-test' 'helm uninstall wiproxy' 'kubectl delete namespace payments'; do
  grep -q "^$teardown" "$work/failing.calls" || fail "no '$teardown' after a failure"
done
echo "failing assertion: exit $status, everything torn down"
echo "e2e-gke-test: 4 dry runs as expected"
