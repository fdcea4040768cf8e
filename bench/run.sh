#!/usr/bin/env bash
# make bench: the sidecar against nginx as the baseline, side by side on loopback.
#
# Both put a bearer token on a request and forward it over HTTPS (kept-alive, verified TLS) to the
# same nginx upstream; nginx's token is a fixed string, the sidecar's comes from its cache (a fake
# metadata server minted it). wrk drives each in turn, twice, and the ratios are printed with the
# sidecar's peak memory. Figures from a 2-core machine with wrk, nginx and the proxy on the same
# cores compare the two; they are not absolute capacities.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${BENCH_SECONDS:-10}
connections=${BENCH_CONNECTIONS:-32}

for tool in wrk nginx; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
    echo "installing $tool"; apt-get update -qq && apt-get install -y -qq wrk nginx >/dev/null
  fi
done
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

cargo build -q --locked --release -p wiproxy-sidecar
cargo build -q --locked -p wiproxy-tests --bin wiproxy-fakes
# Cargo's target directory as cargo resolves it (the Makefile passes it; CARGO_TARGET_DIR counts).
target=${TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -f "$work/nginx.pid" ]; then kill "$(cat "$work/nginx.pid")" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$target/debug/wiproxy-fakes" "$work" > "$work/fakes.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -f "$work/env" ] && break; sleep 0.1; done

mkdir -p "$work/nginx"
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  # The upstream both proxies call: a fixed answer over HTTPS.
  server {
    listen 127.0.0.1:18443 ssl;
    ssl_certificate $work/upstream.crt;
    ssl_certificate_key $work/upstream.key;
    keepalive_requests 100000;
    location / { return 200 "ok\n"; }
  }
  upstream function { server 127.0.0.1:18443; keepalive 64; }
  # The baseline: add a bearer token and forward over verified, kept-alive HTTPS.
  server {
    listen 127.0.0.1:18080;
    keepalive_requests 100000;
    location / {
      proxy_pass https://function/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host bench.example.com;
      proxy_set_header Authorization "Bearer eyJhbGciOiJSUzI1NiJ9.fixed.token";
      proxy_ssl_server_name on;
      proxy_ssl_name bench.example.com;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $work/ca.pem;
      proxy_ssl_session_reuse on;
    }
  }
}
NGINX
"$nginx_bin" -c "$work/nginx.conf"

mapfile -t fakes_env < "$work/env"
env -i "${fakes_env[@]}" \
  WIPROXY_UPSTREAMS="bench=https://bench.example.com" \
  WIPROXY_RESOLVE="bench.example.com=127.0.0.1:18443" \
  WIPROXY_EXTRA_CA_FILE="$work/ca.pem" \
  WIPROXY_LISTEN=127.0.0.1:15080 WIPROXY_ADMIN_LISTEN=127.0.0.1:15081 WIPROXY_LOG=warn \
  "$target/release/wiproxy" > "$work/wiproxy.log" 2>&1 &
sidecar=$!
pids+=("$sidecar")
for _ in $(seq 100); do curl -sf http://127.0.0.1:15081/readyz >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf http://127.0.0.1:15080/bench/ >/dev/null || { echo "the sidecar does not answer"; cat "$work/wiproxy.log"; exit 1; }
curl -sf http://127.0.0.1:18080/ >/dev/null || { echo "nginx does not answer"; cat "$work/nginx-error.log"; exit 1; }

run() { # name url -> "requests/s p50 p99"
  wrk -t2 -c"$connections" -d"${duration}s" --latency "$2" > "$work/$1.wrk"
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/$1.wrk")
  p50=$(awk '$1=="50%" {print $2}' "$work/$1.wrk")
  p99=$(awk '$1=="99%" {print $2}' "$work/$1.wrk")
  echo "$rps $p50 $p99"
}
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) print v/1000; else if (v ~ /ms$/) print v+0; else print v*1000 }'; }

printf '%-8s %-22s %10s %9s %9s\n' round proxy "req/s" "p50 ms" "p99 ms"
declare -A total
for round in 1 2; do
  for name in nginx wiproxy; do
    if [ $name = nginx ]; then url=http://127.0.0.1:18080/; else url=http://127.0.0.1:15080/bench/; fi
    read -r rps p50 p99 < <(run "$name" "$url")
    printf '%-8s %-22s %10s %9s %9s\n' "$round" "$name" "$rps" "$(to_ms "$p50")" "$(to_ms "$p99")"
    total[$name]=$(awk -v a="${total[$name]:-0}" -v b="$rps" 'BEGIN {print a+b}')
  done
done
ratio=$(awk -v w="${total[wiproxy]}" -v n="${total[nginx]}" 'BEGIN {printf "%.2f", w/n}')
peak=$(awk '/VmHWM/ {print $2}' "/proc/$sidecar/status")
size=$(stat -c %s "$target/release/wiproxy")
fetches=$(curl -s http://127.0.0.1:15081/metrics | awk '/^wiproxy_token_fetches_total/ {s+=$2} END {print s+0}')
echo
echo "throughput wiproxy/nginx: $ratio (sum of both rounds)"
echo "wiproxy peak RSS: $((peak / 1024)) MiB; binary: $((size / 1024)) KiB; token fetches during the run: $fetches"
