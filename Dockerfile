# syntax=docker/dockerfile:1
# One image per binary, for users with Docker: docker build --build-arg BIN=wiproxy-webhook .
# (or BIN=wiproxy for the sidecar). The same image `make image` builds with buildah: the release
# binary, built against Debian bookworm's glibc, on distroless/cc (bookworm's libc6, libgcc-s1 and
# ca-certificates, nothing else: no shell), as /app, running as 65532, with the OCI labels.
ARG BIN=wiproxy-webhook

FROM rust:1.95-bookworm AS build
ARG BIN
WORKDIR /src
COPY . .
RUN case "$BIN" in \
      wiproxy) package=wiproxy-sidecar ;; \
      wiproxy-webhook) package=wiproxy-webhook ;; \
      *) echo "BIN must be wiproxy or wiproxy-webhook, not $BIN" >&2; exit 1 ;; \
    esac \
 && cargo build --release --locked -p "$package" --bin "$BIN" \
 && cp "target/release/$BIN" /app

FROM gcr.io/distroless/cc-debian12:nonroot
ARG BIN
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/wiproxy/wiproxy
LABEL org.opencontainers.image.title="$BIN" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /app /app
USER 65532:65532
ENTRYPOINT ["/app"]
