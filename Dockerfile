# syntax=docker/dockerfile:1
# One image per binary: docker build --build-arg BIN=wiproxy-webhook .   (or BIN=wiproxy for the sidecar)
# A static musl binary on distroless/static, running as the non-root user 65532.
ARG BIN=wiproxy-webhook

FROM rust:1.95-bookworm AS build
ARG BIN
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN case "$BIN" in \
      wiproxy) package=wiproxy-sidecar ;; \
      wiproxy-webhook) package=wiproxy-webhook ;; \
      *) echo "BIN must be wiproxy or wiproxy-webhook, not $BIN" >&2; exit 1 ;; \
    esac \
 && cargo build --release --locked --target x86_64-unknown-linux-musl -p "$package" --bin "$BIN" \
 && cp "target/x86_64-unknown-linux-musl/release/$BIN" /app

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /app /app
USER 65532:65532
ENTRYPOINT ["/app"]
