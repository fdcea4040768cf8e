#!/usr/bin/env bash
# make e2e-gke: wiproxy on a real GKE cluster against a real gen2 Cloud Function and Cloud Run
# service. Needs a Google Cloud project, gcloud (logged in), kubectl, helm and skopeo; costs money
# while it runs; never run by CI (docs/e2e-gke.md).
#
# 1. A cluster (GKE Standard with Workload Identity, or Autopilot with AUTOPILOT=1), unless
#    CLUSTER names an existing one.
# 2. In HOST_PROJECT: a gen2 function and a Cloud Run service, both private.
# 3. In PROJECT: a Google service account allowed to invoke both, mapped to the example's KSA by
#    Workload Identity; an Artifact Registry repository with both images.
# 4. The chart, with a TokenProxyPolicy for the example; then examples/deployment.yaml pointed at
#    the real function.
# 5. Asserts: 200 from the function and the service through the sidecar, a refused direct call,
#    a forbidden GSA refused at `kubectl apply`, and a WiproxyDenied Event once the policy stops
#    allowing the workload's GSA.
# 6. Deletes everything it created on exit, pass or fail (KEEP=1 keeps it for a look).
#
# env: PROJECT, REGION (required); HOST_PROJECT (default PROJECT); AUTOPILOT=1; CLUSTER; VERSION,
#      IMAGE_DIR (the OCI archives of make image); RUN_ID (suffix of every name); KEEP=1;
#      DRY_RUN=1 (no waiting between polls and no image archives needed: for stub binaries).
set -euo pipefail
cd "$(dirname "$0")/.."

project=${PROJECT:?PROJECT is required: make e2e-gke PROJECT=... REGION=...}
region=${REGION:?REGION is required: make e2e-gke PROJECT=... REGION=...}
host_project=${HOST_PROJECT:-$project}
autopilot=${AUTOPILOT:-}
version=${VERSION:?VERSION is required}
image_dir=${IMAGE_DIR:-target/images}
dry_run=${DRY_RUN:-}
run_id=${RUN_ID:-$(date +%s | tail -c 7)}
name=wiproxy-e2e-$run_id
cluster=${CLUSTER:-$name}
namespace=payments
release_namespace=wiproxy-system
gsa=$name@$project.iam.gserviceaccount.com
forbidden_gsa=forbidden@$project.iam.gserviceaccount.com
registry=$region-docker.pkg.dev/$project/$name
function_name=orders-$run_id
service_name=inventory-$run_id
poll_seconds=5
[ -z "$dry_run" ] || poll_seconds=0

for tool in gcloud kubectl helm skopeo; do
  command -v "$tool" >/dev/null || { echo "e2e-gke: $tool is missing" >&2; exit 1; }
done
if [ -z "$dry_run" ]; then
  for bin in wiproxy wiproxy-webhook; do
    [ -f "$image_dir/$bin.oci.tar" ] || { echo "e2e-gke: $image_dir/$bin.oci.tar is missing: make image" >&2; exit 1; }
  done
fi

work=$(mktemp -d)
created=()   # what to delete on exit, in order of creation
log() { echo "== $*"; }
run() { echo "+ $*" >&2; "$@"; }
fail() { echo "e2e-gke FAILED: $*" >&2; exit 1; }
# poll TRIES COMMAND...: runs COMMAND until it succeeds.
poll() {
  local tries=$1; shift
  for _ in $(seq "$tries"); do
    if "$@"; then return 0; fi
    sleep "$poll_seconds"
  done
  return 1
}

teardown() {
  local status=$?
  trap - EXIT
  if [ -n "${KEEP:-}" ]; then
    echo "KEEP=1: left in place: ${created[*]}"
  else
    log "Teardown"
    local i
    for (( i=${#created[@]}-1; i>=0; i-- )); do
      case ${created[$i]} in
        cluster) run gcloud container clusters delete "$cluster" --project "$project" --location "$region" --quiet --async || true ;;
        repository) run gcloud artifacts repositories delete "$name" --project "$project" --location "$region" --quiet || true ;;
        gsa) run gcloud iam service-accounts delete "$gsa" --project "$project" --quiet || true ;;
        function) run gcloud functions delete "$function_name" --gen2 --project "$host_project" --region "$region" --quiet || true ;;
        service) run gcloud run services delete "$service_name" --project "$host_project" --region "$region" --quiet || true ;;
        chart)
          run helm uninstall wiproxy -n "$release_namespace" --wait || true
          run kubectl delete crd tokenproxypolicies.wiproxy.io --ignore-not-found || true
          run kubectl delete namespace "$release_namespace" --ignore-not-found --wait=false || true ;;
        namespace) run kubectl delete namespace "$namespace" --ignore-not-found --wait=false || true ;;
      esac
    done
  fi
  rm -rf "$work"
  if [ "$status" = 0 ]; then echo "e2e-gke passed"; else echo "e2e-gke failed (exit $status)"; fi
  exit "$status"
}
trap teardown EXIT

log "APIs"
run gcloud services enable container.googleapis.com artifactregistry.googleapis.com --project "$project"
run gcloud services enable cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com \
  artifactregistry.googleapis.com --project "$host_project"

log "Cluster $cluster"
if [ -z "${CLUSTER:-}" ]; then
  created+=(cluster)
  if [ -n "$autopilot" ]; then
    # Autopilot runs the GKE metadata server on every node: Workload Identity is always on.
    run gcloud container clusters create-auto "$cluster" --project "$project" --location "$region"
  else
    run gcloud container clusters create "$cluster" --project "$project" --location "$region" \
      --num-nodes 1 --machine-type e2-standard-2 --workload-pool "$project.svc.id.goog"
  fi
fi
run gcloud container clusters get-credentials "$cluster" --project "$project" --location "$region"
if run kubectl get namespace "$namespace" >/dev/null 2>&1; then
  fail "namespace $namespace exists in cluster $cluster: the test would take it over; use another cluster"
fi

log "Images to Artifact Registry $registry"
created+=(repository)
run gcloud artifacts repositories create "$name" --project "$project" --location "$region" --repository-format docker
number=$(run gcloud projects describe "$project" --format 'value(projectNumber)')
# The nodes pull with the default compute service account.
run gcloud artifacts repositories add-iam-policy-binding "$name" --project "$project" --location "$region" \
  --member "serviceAccount:$number-compute@developer.gserviceaccount.com" --role roles/artifactregistry.reader >/dev/null
token=$(run gcloud auth print-access-token)   # never printed: it goes to skopeo on standard input
printf '%s' "$token" | run skopeo login --username oauth2accesstoken --password-stdin "$region-docker.pkg.dev"
unset token
for bin in wiproxy wiproxy-webhook; do
  run skopeo copy "oci-archive:$image_dir/$bin.oci.tar" "docker://$registry/$bin:$version"
done

log "In $host_project: a private gen2 function and a private Cloud Run service"
mkdir -p "$work/function"
cat > "$work/function/package.json" <<'JSON'
{"name": "orders", "version": "1.0.0", "main": "index.js", "dependencies": {"@google-cloud/functions-framework": "^3.0.0"}}
JSON
cat > "$work/function/index.js" <<'JS'
const functions = require('@google-cloud/functions-framework');
functions.http('orders', (req, res) => res.json({orders: [], path: req.path, query: req.query}));
JS
created+=(function)
run gcloud functions deploy "$function_name" --gen2 --project "$host_project" --region "$region" --runtime nodejs20 \
  --source "$work/function" --entry-point orders --trigger-http --no-allow-unauthenticated
function_url=$(run gcloud functions describe "$function_name" --gen2 --project "$host_project" --region "$region" --format 'value(url)')
created+=(service)
run gcloud run deploy "$service_name" --project "$host_project" --region "$region" \
  --image us-docker.pkg.dev/cloudrun/container/hello --no-allow-unauthenticated
service_url=$(run gcloud run services describe "$service_name" --project "$host_project" --region "$region" --format 'value(status.url)')
echo "function $function_url, service $service_url"

log "In $project: the Google service account $gsa, invoker of both, mapped to $namespace/orders-client"
created+=(gsa)
run gcloud iam service-accounts create "$name" --project "$project" --display-name "wiproxy e2e $run_id"
run gcloud functions add-invoker-policy-binding "$function_name" --project "$host_project" --region "$region" \
  --member "serviceAccount:$gsa"
run gcloud run services add-iam-policy-binding "$service_name" --project "$host_project" --region "$region" \
  --member "serviceAccount:$gsa" --role roles/run.invoker
run gcloud iam service-accounts add-iam-policy-binding "$gsa" --project "$project" --role roles/iam.workloadIdentityUser \
  --member "serviceAccount:$project.svc.id.goog[$namespace/orders-client]"

log "The chart, with a policy for namespace $namespace"
cat > "$work/values.yaml" <<YAML
image: {repository: $registry/wiproxy-webhook, tag: "$version"}
sidecar: {image: {repository: $registry/wiproxy, tag: "$version"}}
policies:
  - name: e2e
    spec:
      namespaceSelector: {matchLabels: {team: payments}}
      serviceAccounts: ["$gsa"]
      upstreams: ["$function_url", "$service_url"]
      defaultServiceAccount: $gsa
YAML
created+=(chart)
run helm upgrade --install wiproxy charts/wiproxy -n "$release_namespace" --create-namespace -f "$work/values.yaml" \
  --wait --timeout 10m
run kubectl wait tokenproxypolicy/e2e --for condition=Ready --timeout 120s

log "The example, pointed at the real function and service"
upstreams="orders=$function_url,inventory=$service_url;header=x-serverless-authorization"
sed "s|wiproxy.io/upstreams: .*|wiproxy.io/upstreams: \"$upstreams\"|" examples/deployment.yaml > "$work/deployment.yaml"
grep -q "$function_url" "$work/deployment.yaml" || fail "could not point the example at $function_url"
created+=(namespace)
run kubectl apply -f "$work/deployment.yaml"
run kubectl rollout status deployment/orders-client -n "$namespace" --timeout 10m

log "Assert: 200 through the sidecar"
call() { # URL-EXPRESSION: the HTTP status of a call from the app container
  run kubectl exec -n "$namespace" deployment/orders-client -c app -- \
    sh -c "curl -s -o /dev/null -w '%{http_code}' $1"
}
for upstream in ORDERS INVENTORY; do
  status=$(call "\"\$WIPROXY_${upstream}_URL/\"")
  echo "$upstream through the sidecar: $status"
  [ "$status" = 200 ] || fail "$upstream through the sidecar answered $status, not 200"
done

log "Assert: a direct call is refused"
status=$(call "$function_url")
echo "direct call without a token: $status"
# Google's front end refuses a call without a valid token: 401 for a token it rejects, 403 when
# none is given (the function's IAM check); either way the app's code never ran.
[ "$status" = 401 ] || [ "$status" = 403 ] || fail "a direct call answered $status, not 401/403"

log "Assert: a forbidden GSA is refused at kubectl apply"
sed -e "s|name: orders-client$|name: orders-forbidden|" \
  -e "s|wiproxy.io/upstreams: |wiproxy.io/service-account: $forbidden_gsa\n        wiproxy.io/upstreams: |" \
  "$work/deployment.yaml" | awk '/^kind: Deployment/,0' > "$work/forbidden.yaml"
if run kubectl apply -f "$work/forbidden.yaml" > "$work/forbidden.out" 2>&1; then
  fail "kubectl apply of a Deployment with GSA $forbidden_gsa succeeded"
fi
cat "$work/forbidden.out"
grep -q "$forbidden_gsa is not allowed" "$work/forbidden.out" || fail "the refusal does not name the GSA"

log "Assert: a denial Event once the policy no longer allows the workload's GSA"
run kubectl patch tokenproxypolicy e2e --type merge \
  -p "{\"spec\": {\"serviceAccounts\": [\"nobody@$project.iam.gserviceaccount.com\"], \"defaultServiceAccount\": null}}"
# New pods of the ReplicaSet are now denied at creation (an update of the Deployment itself would be
# refused at apply by the validating webhook); the Event lands on the Deployment.
run kubectl delete pods -n "$namespace" -l app=orders-client --wait=false
denial_event() {
  run kubectl get events -n "$namespace" --field-selector reason=WiproxyDenied,involvedObject.name=orders-client \
    -o 'jsonpath={.items[*].message}' > "$work/events.txt" && grep -q 'not allowed' "$work/events.txt"
}
poll 36 denial_event || fail "no WiproxyDenied event on deployment/orders-client"
echo "WiproxyDenied: $(head -c 300 "$work/events.txt")"
