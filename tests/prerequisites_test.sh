#!/usr/bin/env bash
# scripts/prerequisites.sh as a user who is not root, on a machine without shellcheck: one line
# naming shellcheck and the one command that installs it, exit 2, nothing run after it. Needs
# root (make test runs as root) to switch to the unprivileged user.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "tests/prerequisites_test.sh switches to user nobody: run it as root"
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A copy the unprivileged user can read wherever the clone is, with a marker that shows whether
# the script went past its check (it would run make there).
mkdir -p "$work/clone/scripts" "$work/bin"
cp scripts/prerequisites.sh "$work/clone/scripts/"
printf 'tools:\n\ttouch %s/clone/went-on\n' "$work" > "$work/clone/Makefile"
chmod -R a+rX "$work"
chmod a+w "$work/clone"
# Every command of the usual directories except shellcheck (an empty directory adds none).
shopt -s nullglob
for dir in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
  for command in "$dir"/*; do
    name=$(basename "$command")
    [ "$name" = shellcheck ] || [ -e "$work/bin/$name" ] || ln -s "$command" "$work/bin/$name"
  done
done

# The toolchain as make finds it (root's own is out of this user's reach): cargo, with fmt,
# clippy and deny installed.
cat > "$work/bin/cargo" <<'STUB'
#!/bin/sh
case "$1 $2" in
  "--version " | "fmt --version" | "clippy --version" | "deny --version") echo "cargo-$1 0.0.0" ;;
  *) exit 101 ;;
esac
STUB
chmod a+rx "$work/bin/cargo"
rm -f "$work/bin/rustup"

status=0
output=$(cd / && setpriv --reuid=65534 --regid=65534 --clear-groups env -i HOME=/nonexistent \
  PATH="$work/bin" bash "$work/clone/scripts/prerequisites.sh" 2>&1) || status=$?

fail() { echo "prerequisites test: $1"; echo "output was:"; echo "$output"; exit 1; }
[ "$status" = 2 ] || fail "exit $status, not 2"
[ "$(printf '%s\n' "$output" | wc -l)" = 1 ] || fail "not one line"
case "$output" in *"No such file"* | *"command not found"*) fail "a raw error" ;; esac
[[ "$output" == "make test needs shellcheck (make demo does not): install with 'sudo apt-get update && sudo apt-get install -y shellcheck', or run make test as root, which installs them" ]] ||
  fail "not the message naming shellcheck and its one install command"
[ ! -e "$work/clone/went-on" ] || fail "it went on past the check"
echo "prerequisites test: as nobody without shellcheck, exit 2 and one line:"
echo "  $output"
