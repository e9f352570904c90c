# kakao-tokend in a container: glibc, CA certificates, the binary and a non-root user (65532); no shell,
# no package manager. Token files live in the volume /var/lib/kakao-tokend; the config is read from the
# folder /etc/kakao-tokend (mount it read-only). See the README's "In a container".
#
# The ordinary build, with public base images:
#   docker build -t kakao-tokend .
#
# With no registry at hand, the same file builds from local stand-ins: a runtime base given as
# RUNTIME_IMAGE, and a binary built on this machine (docker/build-image.sh does both):
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --no-default-features \
#       --target x86_64-unknown-linux-gnu    # then copied to target/docker/bin/
#   docker build --target from-host-binary --build-arg RUNTIME_IMAGE=kakao-tokend-runtime:standin -t kakao-tokend .
#
# Docker's legacy builder builds every stage up to the target, used or not: the stages a registry-less
# build needs come first, and the Rust toolchain image is only reached by the ordinary build.

ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG BUILD_IMAGE=docker.io/library/rust:1.95-slim-bookworm

# What a build on the host left in target/docker/ (bin/kakao-tokend, lib/kakao-tokend/ made 0750); empty
# folders when it left nothing, so that the ordinary build passes through here too.
FROM scratch AS host-binary
WORKDIR /host/bin
WORKDIR /host/lib
COPY .dockerignore target/docker* /host/

# The runtime, shared by both ways of building: everything but the binary and the volume's folder.
FROM ${RUNTIME_IMAGE} AS runtime-base
# Whatever the base says: the static binary resolves names only with glibc's built-in services.
COPY docker/nsswitch.conf /etc/nsswitch.conf
USER 65532:65532
# Token files, locks, backups and state files; created 0750 and owned by 65532 (a named volume copies both).
VOLUME ["/var/lib/kakao-tokend"]
# The exec form: the image has no shell. Exit 0 when every account holds a valid access token.
HEALTHCHECK --interval=1m --timeout=10s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/kakao-tokend", "status"]
ENTRYPOINT ["/usr/local/bin/kakao-tokend"]
CMD ["run"]

# The image from a binary built on the host.
FROM runtime-base AS from-host-binary
COPY --from=host-binary /host/bin/ /usr/local/bin/
COPY --from=host-binary --chown=65532:65532 /host/lib/ /var/lib/

# The ordinary build: the binary built here, without the demo (the image carries no fake provider),
# static, stripped by the release profile.
FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY core ./core
COPY fake-kakao ./fake-kakao
# Linked statically against glibc (its `files` and `dns` name services are built in): no shared library
# is mapped at run time, which keeps an idle daemon about 1 MiB smaller. The explicit target keeps build
# scripts and proc macros dynamic.
RUN target=$(rustc --print host-tuple) \
    && RUSTFLAGS="-C target-feature=+crt-static" \
       cargo build --release --locked --no-default-features --bin kakao-tokend --target "$target" \
    && install -D -m 0755 "target/$target/release/kakao-tokend" /out/bin/kakao-tokend \
    && install -d -m 0750 /out/lib/kakao-tokend

FROM runtime-base AS runtime
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build --chown=65532:65532 /out/lib/ /var/lib/
