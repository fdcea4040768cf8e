#!/usr/bin/env bash
# The local story, step by step: what an app team writes, what the webhook makes of it.
set -euo pipefail
webhook=${1:-target/debug/wiproxy-webhook}
cd "$(dirname "$0")/.."
out=target/demo
mkdir -p "$out"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "The app team's change: one label and one annotation on the pod template"
grep -nE 'wiproxy\.io/(inject|upstreams)' examples/deployment.yaml

step "The platform team's policy (examples/policy.yaml)"
grep -vE '^\s*#' examples/policy.yaml

step "wiproxy-webhook render: the injected Deployment and the Workload Identity annotation"
"$webhook" render -f examples/deployment.yaml --policy-file examples/policy.yaml > "$out/rendered.yaml"
grep -nE 'iam.gke.io/gcp-service-account|wiproxy.io/status|- name: (wiproxy|WIPROXY_[A-Z_]+)$|restartPolicy: Always|gke-metadata-server-enabled' "$out/rendered.yaml"

step "Rendering the output again changes nothing"
"$webhook" render -f "$out/rendered.yaml" --policy-file examples/policy.yaml | cmp - "$out/rendered.yaml"
echo "identical"

step "A GSA outside the policy is refused with a message that names the fix"
sed 's|wiproxy.io/upstreams:|wiproxy.io/service-account: admin@host-project.iam.gserviceaccount.com\n        wiproxy.io/upstreams:|' \
  examples/deployment.yaml > "$out/forbidden.yaml"
if "$webhook" render -f "$out/forbidden.yaml" --policy-file examples/policy.yaml > /dev/null 2> "$out/forbidden.err"; then
  echo "expected a denial" >&2
  exit 1
fi
cat "$out/forbidden.err"

printf '\nDemo finished: the full manifest is in %s/rendered.yaml\n' "$out"
