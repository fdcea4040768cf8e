#!/usr/bin/env bash
# make image: both container images with buildah, from the release binaries, with no daemon and no
# registry access.
#
# The base holds what distroless/cc holds: the C runtime (libc6, libgcc-s1) and the CA
# certificates, taken from Debian packages with `apt-get download` and unpacked with `dpkg -x`, plus
# the user nonroot (65532) in /etc/passwd. No shell, no package manager. Each image adds one binary
# as its entry point and the OCI labels, runs as 65532:65532, and is exported as an OCI archive.
#
# usage: image/build.sh BIN_DIR OUT_DIR
#   BIN_DIR   folder with the release binaries wiproxy and wiproxy-webhook
#   OUT_DIR   where wiproxy.oci.tar and wiproxy-webhook.oci.tar are written
# env: VERSION (required), REVISION, SOURCE, REPOSITORY (default ghcr.io/wiproxy), SOURCE_DATE_EPOCH
set -euo pipefail

bin_dir=${1:?usage: image/build.sh BIN_DIR OUT_DIR}
out_dir=${2:?usage: image/build.sh BIN_DIR OUT_DIR}
version=${VERSION:?VERSION is required}
revision=${REVISION:-unknown}
source_url=${SOURCE:-https://github.com/wiproxy/wiproxy}
repository=${REPOSITORY:-ghcr.io/wiproxy}
epoch=${SOURCE_DATE_EPOCH:-0}
packages=(libc6 libgcc-s1 ca-certificates)

for tool in buildah apt-get dpkg dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "image/build.sh: $tool is missing (apt-get install buildah)" >&2; exit 1; }
done
for bin in wiproxy wiproxy-webhook; do
  [ -x "$bin_dir/$bin" ] || { echo "image/build.sh: $bin_dir/$bin is missing: build the release binaries first" >&2; exit 1; }
done

work=$(mktemp -d)
containers=()
cleanup() {
  for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# --- the base file system ---------------------------------------------------------------------
arch=$(dpkg --print-architecture)
mkdir -p "$work/debs" "$work/rootfs"
# apt-get download writes into the current folder, which its _apt sandbox user cannot write to.
(cd "$work/debs" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]/%/:$arch}")
rootfs=$work/rootfs
mkdir -p "$rootfs/var/lib/dpkg/status.d"
for package in "${packages[@]}"; do
  debs=("$work/debs/${package}"_*.deb)
  deb=${debs[0]}
  [ -f "$deb" ] || { echo "image/build.sh: apt-get download $package failed (run apt-get update?)" >&2; exit 1; }
  dpkg -x "$deb" "$rootfs"
  # The package record, as distroless keeps it, so image scanners and SBOM tools see the packages.
  dpkg-deb -f "$deb" > "$rootfs/var/lib/dpkg/status.d/$package"
  echo "base: $(basename "$deb")"
done
# What dpkg's maintainer scripts would have done: the CA bundle. Then drop the script that builds it
# (a shell script, and there is no shell), changelogs and lintian overrides; copyright files stay.
mkdir -p "$rootfs/etc/ssl/certs"
cat "$rootfs"/usr/share/ca-certificates/mozilla/*.crt > "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs/usr/sbin" "$rootfs/etc/ca-certificates" "$rootfs/usr/share/lintian"
find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
cp /usr/lib/os-release "$rootfs/etc/os-release"
cat > "$rootfs/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat > "$rootfs/etc/group" <<GROUP
root:x:0:
nonroot:x:65532:
GROUP
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
mkdir -p "$rootfs/home/nonroot" "$rootfs/tmp"
chown 65532:65532 "$rootfs/home/nonroot"
chmod 1777 "$rootfs/tmp"
for shell in bin/sh bin/bash bin/dash usr/bin/sh; do
  [ ! -e "$rootfs/$shell" ] || { echo "image/build.sh: the base has a shell ($shell)" >&2; exit 1; }
done
# Every library the binaries need must be in the base.
for bin in wiproxy wiproxy-webhook; do
  for lib in $(readelf -d "$bin_dir/$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    if ! find "$rootfs/lib" "$rootfs/usr/lib" -name "$lib" 2>/dev/null | grep -q .; then
      echo "image/build.sh: $bin needs $lib, which the base lacks" >&2; exit 1
    fi
  done
done

labels=(
  --label "org.opencontainers.image.source=$source_url"
  --label "org.opencontainers.image.version=$version"
  --label "org.opencontainers.image.revision=$revision"
  --label "org.opencontainers.image.licenses=Apache-2.0"
  --label "org.opencontainers.image.vendor=wiproxy"
)
base=$(buildah from scratch)
containers+=("$base")
buildah add --quiet "$base" "$rootfs" / >/dev/null
buildah config --arch "$arch" --os linux --user 65532:65532 --workingdir /home/nonroot \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "${labels[@]}" \
  --label "org.opencontainers.image.title=wiproxy-base" "$base"
buildah commit --quiet --timestamp "$epoch" "$base" "localhost/wiproxy-base:$version" >/dev/null

# --- one image per binary ---------------------------------------------------------------------
mkdir -p "$out_dir"
describe() {
  case $1 in
    wiproxy) echo "wiproxy token-proxy sidecar: adds Google-signed ID tokens to calls to private Cloud Functions and Cloud Run" ;;
    wiproxy-webhook) echo "wiproxy admission webhook: injects the wiproxy sidecar into labelled pods" ;;
  esac
}
for bin in wiproxy wiproxy-webhook; do
  image="$repository/$bin:$version"
  c=$(buildah from --pull-never "localhost/wiproxy-base:$version")
  containers+=("$c")
  buildah copy --quiet --chown 0:0 --chmod 0755 "$c" "$bin_dir/$bin" /app >/dev/null
  buildah config --entrypoint '["/app"]' --cmd '' --user 65532:65532 "${labels[@]}" \
    --label "org.opencontainers.image.title=$bin" \
    --label "org.opencontainers.image.description=$(describe "$bin")" "$c"
  buildah commit --quiet --timestamp "$epoch" "$c" "$image" >/dev/null
  rm -f "$out_dir/$bin.oci.tar"
  buildah push --quiet "$image" "oci-archive:$out_dir/$bin.oci.tar:$image"
  echo "image $image -> $out_dir/$bin.oci.tar ($(du -h "$out_dir/$bin.oci.tar" | cut -f1) archive)"
done
