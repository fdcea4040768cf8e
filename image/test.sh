#!/usr/bin/env bash
# make image-test: runs the images built by `make image` as a cluster would.
#
# 1. The sidecar image, loaded from its OCI archive into a scratch podman store, runs exactly as
#    the webhook injects it: the env, args, user, memory limit and security context are read from
#    `wiproxy-webhook render` of examples/deployment.yaml (read-only root, all capabilities
#    dropped, no privilege escalation, user 65532, 64Mi). It reaches the fakes (metadata server,
#    Cloud Function front end) on the host network; a call through it is answered, a direct call
#    is refused, and the process is checked from the host (/proc: uid, capabilities,
#    no_new_privs, cgroup memory limit).
# 2. The webhook image runs `serve` with a test certificate and answers AdmissionReviews: one
#    allowed with a patch, one denied with its message.
# 3. The image sizes are printed.
#
# usage: image/test.sh IMAGE_DIR WEBHOOK_BIN FAKES_BIN
# env: VERSION (required), REPOSITORY (default ghcr.io/wiproxy), PYTHON (with PyYAML)
set -euo pipefail
cd "$(dirname "$0")/.."

image_dir=${1:?usage: image/test.sh IMAGE_DIR WEBHOOK_BIN FAKES_BIN}
webhook_bin=${2:?usage: image/test.sh IMAGE_DIR WEBHOOK_BIN FAKES_BIN}
fakes_bin=${3:?usage: image/test.sh IMAGE_DIR WEBHOOK_BIN FAKES_BIN}
version=${VERSION:?VERSION is required}
repository=${REPOSITORY:-ghcr.io/wiproxy}
python=${PYTHON:-python3}
sidecar_image=$repository/wiproxy:$version
webhook_image=$repository/wiproxy-webhook:$version

for tool in podman runc curl openssl; do
  command -v "$tool" >/dev/null || { echo "image/test.sh: $tool is missing (apt-get install podman runc curl openssl)" >&2; exit 1; }
done

work=$(mktemp -d)
chmod 0755 "$work"
store=(--root "$work/storage" --runroot "$work/run")
fakes_pid=
cleanup() {
  [ -z "$fakes_pid" ] || kill "$fakes_pid" 2>/dev/null || true
  podman "${store[@]}" rm -f -t 2 image-test-sidecar image-test-webhook >/dev/null 2>&1 || true
  podman "${store[@]}" system reset -f >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "image-test FAILED: $*" >&2
  for c in image-test-sidecar image-test-webhook; do
    podman "${store[@]}" logs "$c" 2>/dev/null | tail -n 20 | sed "s/^/  $c: /" >&2 || true
  done
  exit 1
}
free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { # URL [CURL ARGS...]: waits up to 20 s for a 200
  local url=$1; shift
  for _ in $(seq 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url")" = 200 ] && return 0
    sleep 0.1
  done
  return 1
}
# Podman flags for a container as a restricted pod runs it. runc: crun refuses hybrid cgroup
# hierarchies; explicit ulimits no higher than this shell's hard limits: rootful podman would
# otherwise raise them, which runc cannot do once every capability is dropped.
limit() { # HARD-LIMIT CAP: the smaller of the two
  if [ "$1" = unlimited ] || [ "$1" -gt "$2" ]; then echo "$2"; else echo "$1"; fi
}
nofile=$(limit "$(ulimit -Hn)" 65536)
nproc=$(limit "$(ulimit -Hu)" 4096)
restricted=(--runtime runc --network host --read-only --cap-drop ALL --security-opt no-new-privileges
  --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

echo "== Loading the OCI archives into a scratch store"
for bin in wiproxy wiproxy-webhook; do
  podman "${store[@]}" load -q -i "$image_dir/$bin.oci.tar"
done
for image in "$sidecar_image" "$webhook_image"; do
  podman "${store[@]}" image exists "$image" || fail "$image is not in the archives"
  user=$(podman "${store[@]}" image inspect --format '{{.Config.User}}' "$image")
  [ "$user" = 65532:65532 ] || fail "$image runs as $user, not 65532:65532"
  for label in source version revision; do
    value=$(podman "${store[@]}" image inspect --format "{{index .Labels \"org.opencontainers.image.$label\"}}" "$image")
    if [ -z "$value" ] || [ "$value" = "<no value>" ]; then fail "$image lacks label org.opencontainers.image.$label"; fi
    echo "  $image org.opencontainers.image.$label=$value"
  done
done

echo "== What the webhook injects: wiproxy-webhook render -f examples/deployment.yaml"
"$webhook_bin" render -f examples/deployment.yaml --policy-file examples/policy.yaml --sidecar-image "$sidecar_image" \
  > "$work/rendered.yaml"
"$python" - "$work/rendered.yaml" "$work" <<'PY'
import sys, yaml
rendered, work = sys.argv[1:]
deployment = next(d for d in yaml.safe_load_all(open(rendered)) if d and d["kind"] == "Deployment")
pod = deployment["spec"]["template"]["spec"]
sidecar = next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "wiproxy")
context = sidecar["securityContext"]
limit = sidecar["resources"]["limits"]["memory"]
units = {"Mi": "m", "Gi": "g", "Ki": "k"}
memory = next((limit[:-2] + units[u] for u in units if limit.endswith(u)), limit)
facts = {
    "IMAGE": sidecar["image"],
    "ARGS": " ".join(sidecar.get("args", [])),
    "USER": f'{context["runAsUser"]}:{context["runAsGroup"]}',
    "MEMORY": memory,
    "READ_ONLY": str(context["readOnlyRootFilesystem"]).lower(),
    "NO_ESCALATION": str(not context["allowPrivilegeEscalation"]).lower(),
    "DROP": ",".join(context["capabilities"]["drop"]),
}
with open(f"{work}/sidecar.facts", "w") as f:
    for key, value in facts.items():
        f.write(f"RENDERED_{key}='{value}'\n")
with open(f"{work}/sidecar.env", "w") as f:
    for e in sidecar["env"]:
        f.write(f'{e["name"]}={e["value"]}\n')
for key, value in facts.items():
    print(f"  {key.lower()}: {value}")
for e in sidecar["env"]:
    print(f'  env {e["name"]}={e["value"]}')
PY
# shellcheck disable=SC1091
. "$work/sidecar.facts"
[ "$RENDERED_IMAGE" = "$sidecar_image" ] || fail "rendered image $RENDERED_IMAGE"
if [ "$RENDERED_READ_ONLY" != true ] || [ "$RENDERED_NO_ESCALATION" != true ] || [ "$RENDERED_DROP" != ALL ]; then
  fail "the rendered security context changed"
fi
[ "$RENDERED_USER" = 65532:65532 ] || fail "the rendered sidecar runs as $RENDERED_USER"

echo "== The fakes on loopback (metadata server, Cloud Function front end)"
mkdir -m 0755 "$work/fakes"
"$fakes_bin" "$work/fakes" > "$work/fakes.log" 2>&1 &
fakes_pid=$!
for _ in $(seq 200); do [ -f "$work/fakes/env" ] && break; sleep 0.1; done
[ -f "$work/fakes/env" ] || fail "the fakes did not start: $(cat "$work/fakes.log")"
chmod 0644 "$work/fakes/"*
cat "$work/fakes.log"
# shellcheck disable=SC1091
. "$work/fakes/function.env"

listen_port=$(free_port)
admin_port=$(free_port)
{
  # Where a pod meets Google, the test meets the fakes; with the host network, both ports on loopback.
  cat "$work/fakes/env"
  echo "WIPROXY_RESOLVE=$WIPROXY_RESOLVE"
  echo "WIPROXY_EXTRA_CA_FILE=/fakes/ca.pem"
  echo "WIPROXY_LISTEN=127.0.0.1:$listen_port"
  echo "WIPROXY_ADMIN_LISTEN=127.0.0.1:$admin_port"
} > "$work/local.env"
sed 's/^/  + /' "$work/local.env"

echo "== The sidecar image: podman run --read-only --cap-drop ALL --security-opt no-new-privileges --user $RENDERED_USER --memory $RENDERED_MEMORY"
# shellcheck disable=SC2086 # RENDERED_ARGS is the container's argument list, split on purpose.
podman "${store[@]}" run -d --name image-test-sidecar "${restricted[@]}" --user "$RENDERED_USER" --memory "$RENDERED_MEMORY" \
  --env-file "$work/sidecar.env" --env-file "$work/local.env" -v "$work/fakes:/fakes:ro" \
  "$RENDERED_IMAGE" $RENDERED_ARGS > /dev/null
wait_for "http://127.0.0.1:$admin_port/readyz" || fail "the sidecar did not become ready: $(curl -s "http://127.0.0.1:$admin_port/readyz")"
echo "  /readyz: $(curl -s "http://127.0.0.1:$admin_port/readyz")"

pid=$(podman "${store[@]}" inspect --format '{{.State.Pid}}' image-test-sidecar)
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
capabilities=$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")
no_new_privs=$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$pid/status")
[ "$uid" = 65532 ] || fail "the sidecar runs as uid $uid"
[ "$capabilities" = 0000000000000000 ] || fail "the sidecar has capabilities $capabilities"
[ "$no_new_privs" = 1 ] || fail "no_new_privs is not set"
[ "$(podman "${store[@]}" inspect --format '{{.HostConfig.ReadonlyRootfs}}' image-test-sidecar)" = true ] || fail "root file system is writable"
memory_bytes=$(podman "${store[@]}" inspect --format '{{.HostConfig.Memory}}' image-test-sidecar)
[ "$memory_bytes" = $((64 * 1024 * 1024)) ] || fail "memory limit $memory_bytes"
# The limit as the kernel enforces it: cgroup v2 memory.max or v1 memory.limit_in_bytes.
cgroup_limit=unknown
while IFS=: read -r _ controllers path; do
  for file in "/sys/fs/cgroup$path/memory.max" "/sys/fs/cgroup/memory$path/memory.limit_in_bytes"; do
    if { [ -z "$controllers" ] || [[ ,$controllers, == *,memory,* ]]; } && [ -r "$file" ]; then
      cgroup_limit=$(cat "$file")
    fi
  done
done < "/proc/$pid/cgroup"
[ "$cgroup_limit" = "$memory_bytes" ] || fail "the kernel's memory limit is $cgroup_limit, not $memory_bytes"
echo "  process $pid: uid $uid, CapEff $capabilities, NoNewPrivs $no_new_privs, read-only root, cgroup memory limit $cgroup_limit bytes"

echo "== A direct call: GET https://europe-west1-host-project.cloudfunctions.net/orders/v1/orders without a token"
host=europe-west1-host-project.cloudfunctions.net
direct=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/fakes/ca.pem" \
  --resolve "$host:${FUNCTION_ADDR##*:}:127.0.0.1" "https://$host:${FUNCTION_ADDR##*:}/orders/v1/orders")
echo "  $direct"
# Google's front end answers a call without a token 403; 401 is for a token it cannot verify.
[ "$direct" = 403 ] || fail "the function answered $direct to a call without a token"

echo "== Through the sidecar container: GET http://127.0.0.1:$listen_port/orders/v1/orders?status=open"
status=$(curl -s -o "$work/answer.json" -w '%{http_code}' "http://127.0.0.1:$listen_port/orders/v1/orders?status=open")
echo "  $status"
"$python" - "$work/answer.json" <<'PY'
import json, sys
answer = json.load(open(sys.argv[1]))
for field in ["path", "query", "email", "audience"]:
    print(f"  function saw {field}: {answer.get(field)}")
PY
[ "$status" = 200 ] || fail "the call through the sidecar got $status: $(cat "$work/answer.json")"
grep -q '"email": *"invoker@client-project.iam.gserviceaccount.com"' "$work/answer.json" || fail "the function saw another identity"
rss=$(awk '/^VmRSS:/ {print $2 " " $3}' "/proc/$pid/status")
echo "  sidecar RSS after the call: $rss"

echo "== No shell in the images"
for image in "$sidecar_image" "$webhook_image"; do
  c=$(podman "${store[@]}" create --runtime runc "$image")
  podman "${store[@]}" export "$c" | tar -t > "$work/files.txt"
  podman "${store[@]}" rm "$c" > /dev/null
  if grep -Eq '^(\./)?(usr/)?s?bin/(sh|bash|dash|busybox)$' "$work/files.txt"; then fail "$image has a shell"; fi
  grep -qx 'etc/ssl/certs/ca-certificates.crt' "$work/files.txt" || fail "$image has no CA bundle"
  echo "  $image: $(wc -l < "$work/files.txt") entries, no shell; top level: $(grep -E '^[^/]+/?$' "$work/files.txt" | tr -d / | sort -u | tr '\n' ' ')"
done

echo "== The webhook image: serve with a test certificate"
mkdir -m 0755 "$work/tls"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$work/tls/tls.key" -out "$work/tls/tls.crt" 2>/dev/null
chmod 0644 "$work/tls/"*
mkdir -m 0755 "$work/config"
cp examples/policy.yaml webhook/tests/golden/cluster.yaml "$work/config/"
chmod 0644 "$work/config/"*
https_port=$(free_port)
metrics_port=$(free_port)
podman "${store[@]}" run -d --name image-test-webhook "${restricted[@]}" --memory 256m \
  -v "$work/tls:/tls:ro" -v "$work/config:/config:ro" "$webhook_image" \
  serve --listen "127.0.0.1:$https_port" --admin-listen "127.0.0.1:$metrics_port" \
  --tls-cert-file /tls/tls.crt --tls-key-file /tls/tls.key --policy-file /config/policy.yaml \
  --cluster-file /config/cluster.yaml --native-sidecars always --sidecar-image "$sidecar_image" > /dev/null
wait_for "http://127.0.0.1:$metrics_port/readyz" || fail "the webhook did not become ready"
"$python" - webhook/tests/fixtures/review-pod.json "$work" <<'PY'
import json, sys
review = json.load(open(sys.argv[1]))
json.dump(review, open(f"{sys.argv[2]}/allowed.json", "w"))
review["request"]["uid"] = "00000000-0000-4000-8000-00000000dead"
review["request"]["object"]["metadata"]["annotations"]["wiproxy.io/service-account"] = "admin@host-project.iam.gserviceaccount.com"
json.dump(review, open(f"{sys.argv[2]}/denied.json", "w"))
PY
for case in allowed denied; do
  curl -sf --cacert "$work/tls/tls.crt" -H 'Content-Type: application/json' --data-binary "@$work/$case.json" \
    "https://localhost:$https_port/mutate" -o "$work/$case-answer.json" || fail "POST /mutate ($case) failed"
done
"$python" - "$work" <<'PY'
import base64, json, sys
work = sys.argv[1]
allowed = json.load(open(f"{work}/allowed-answer.json"))["response"]
patch = json.loads(base64.b64decode(allowed["patch"]))
added = [op["value"]["name"] for op in patch if op["op"] == "add" and isinstance(op["value"], dict) and "image" in op["value"]]
added += [c["name"] for op in patch if op["op"] == "add" and isinstance(op["value"], list) for c in op["value"] if isinstance(c, dict) and "image" in c]
print(f'  allowed review: allowed={allowed["allowed"]}, {len(patch)} patch operations, containers added: {added}')
assert allowed["allowed"] is True and allowed["patchType"] == "JSONPatch" and "wiproxy" in added, allowed
denied = json.load(open(f"{work}/denied-answer.json"))["response"]
print(f'  denied review: allowed={denied["allowed"]}, message: {denied["status"]["message"][:110]}...')
assert denied["allowed"] is False and "admin@host-project.iam.gserviceaccount.com is not allowed" in denied["status"]["message"], denied
PY
reviews=$(curl -s "http://127.0.0.1:$metrics_port/metrics" | grep -c '^wiproxy_webhook_reviews_total{' || true)
[ "$reviews" -ge 2 ] || fail "the webhook's metrics do not count the reviews"
echo "  /metrics counts them ($reviews series of wiproxy_webhook_reviews_total)"

echo "== Image sizes"
podman "${store[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -v '<none>' | sed 's/^/  /'
for bin in wiproxy wiproxy-webhook; do
  echo "  $bin.oci.tar: $(du -k "$image_dir/$bin.oci.tar" | cut -f1) KiB (compressed layers)"
done
echo "image-test passed: the sidecar image answered through its proxy, the webhook image answered reviews"
