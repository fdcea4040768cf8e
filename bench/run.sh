#!/usr/bin/env bash
# make bench: builds what it measures, installs wrk, nginx and valgrind when missing, then runs
# bench/bench.py, which prints every figure and writes bench/RESULTS.md (see its docstring for
# how the comparison is kept fair). BENCH_SECONDS (per wrk run, default 3), BENCH_ROUNDS
# (default 3) and BENCH_PROXY_CPUS (taskset list, default every core) tune it; BENCH_ONLY=cluster
# measures only the webhook against the fake Kubernetes API server and prints its report.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in wrk nginx valgrind taskset; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
    case $tool in taskset) missing+=(util-linux) ;; *) missing+=("$tool") ;; esac
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Everything measured or run comes from one cargo profile, in one build: `measure` (Cargo.toml:
# the release profile without cross-crate LTO, which a fresh clone builds in a few minutes), or
# BENCH_PROFILE=release for the shipped binaries (about 7 minutes more when cold).
profile=${BENCH_PROFILE:-measure}
case $profile in dev) dir=debug ;; *) dir=$profile ;; esac
started=$(date +%s)
if [ "${BENCH_ONLY:-}" = cluster ]; then
  cargo build -q --locked --profile "$profile" -p wiproxy-webhook -p wiproxy-tests \
    --bin wiproxy-webhook --bin wiproxy-fakes --bin wiproxy-fake-kube
else
  cargo build -q --locked --profile "$profile" -p wiproxy-sidecar -p wiproxy-webhook -p wiproxy-tests \
    --bin wiproxy --bin wiproxy-webhook --bin wiproxy-fakes --bin wiproxy-fake-kube --example review-cost
fi
echo "built ($profile profile) in $(($(date +%s) - started)) s"
# Cargo's target directory as cargo resolves it (the Makefile passes it; CARGO_TARGET_DIR counts).
target=${TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}
python3 bench/bench.py "$target/$dir" "$profile"
