#!/usr/bin/env bash
# What `make test` needs beyond the Rust toolchain (make demo needs none of it). The first step of
# `make test` and of .ci/run. As root it installs whatever is missing: Debian packages, the
# toolchain's rustfmt and clippy, cargo-deny, then the PyPI and npm tools under .tools/. As
# another user, when anything that needs root or cargo install is missing, it prints the one
# command that installs it and exits 2 before any other work.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1; }

if ! have cargo; then
  echo "make test needs a Rust toolchain and finds no cargo on PATH: install one with rustup (rustup.rs), then run it again"
  exit 2
fi

# Debian packages: python3-venv (kubernetes-validate, check-jsonschema and the interop suite's
# Python packages go into .tools/venv), npm (Helm comes from an npm package), buildah, podman, runc
# and skopeo (make image, image-test, push), shellcheck, curl and openssl for the image test;
# nginx, nghttp2-client (nghttp, h2load) and nodejs for make interop; setpriv (util-linux) for the
# test of this script; procps below.
packages=()
# `python3 -m venv` needs ensurepip, which Debian ships in python3-venv, not with python3.
python3 -c "import ensurepip" >/dev/null 2>&1 || packages+=(python3-venv)
for tool in npm buildah podman runc skopeo shellcheck curl openssl; do
  have "$tool" || packages+=("$tool")
done
have nginx || [ -x /usr/sbin/nginx ] || packages+=(nginx)
have h2load || packages+=(nghttp2-client)
have node || packages+=(nodejs)
have setpriv || packages+=(util-linux)
# The tests stop the processes they start with the kill program (procps), not bash's builtin; a
# minimal Debian has only the builtin.
type -P kill >/dev/null || packages+=(procps)
# make image takes libc6, libgcc-s1 and ca-certificates with apt-get download: it needs the lists.
lists=yes
if [ "$(apt-get download --print-uris libc6 libgcc-s1 ca-certificates 2>/dev/null | grep -c "^'" || true)" != 3 ]; then
  lists=no
fi

# The toolchain's lint components, when rustup manages it (the owner of the toolchain adds them).
if have rustup && ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
components=()
cargo fmt --version >/dev/null 2>&1 || components+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || components+=(clippy)
deny=yes
cargo deny --version >/dev/null 2>&1 || deny=no

if [ "$(id -u)" != 0 ]; then
  steps=()
  missing=()
  if [ "${#packages[@]}" -gt 0 ] || [ "$lists" = no ]; then
    step="sudo apt-get update"
    if [ "${#packages[@]}" -gt 0 ]; then
      step="$step && sudo apt-get install -y ${packages[*]}"
      missing+=("${packages[@]}")
    else
      missing+=("the Debian package lists")
    fi
    steps+=("$step")
  fi
  if [ "${#components[@]}" -gt 0 ]; then
    steps+=("rustup component add ${components[*]}")
    missing+=("${components[@]}")
  fi
  if [ "$deny" = no ]; then
    steps+=("cargo install --locked cargo-deny")
    missing+=(cargo-deny)
  fi
  if [ "${#steps[@]}" -gt 0 ]; then
    command=$(printf ' && %s' "${steps[@]}")
    echo "make test needs ${missing[*]} (make demo does not): install with '${command:4}', or run make test as root, which installs them"
    exit 2
  fi
else
  if [ "${#packages[@]}" -gt 0 ] || [ "$lists" = no ]; then
    apt-get update -qq
  fi
  if [ "${#packages[@]}" -gt 0 ]; then
    echo "installing ${packages[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
  fi
  if [ "${#components[@]}" -gt 0 ]; then
    echo "the toolchain has no ${components[*]}: install it with rustup (rustup component add ${components[*]})"
    exit 2
  fi
  # cargo-deny (make deny), built from crates.io with its own lock file (a few minutes, once).
  if [ "$deny" = no ]; then
    echo "installing cargo-deny"
    cargo install --locked --quiet cargo-deny
  fi
fi

# The PyPI and npm tools, into .tools/ (no root needed).
make --no-print-directory tools
