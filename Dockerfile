# kakao-tokend in a container: a small image (distroless, glibc), a non-root user, token files in a volume.
#   docker build -t kakao-tokend .
#   docker run -d --name kakao-tokend \
#     -v /srv/kakao-tokend/config.toml:/etc/kakao-tokend/config.toml:ro \
#     -v /srv/kakao-tokend/tokens:/var/lib/kakao-tokend \
#     -e KAKAO_TOKEND__ACCOUNTS__ME__CLIENT_SECRET=... kakao-tokend
# Mount the folder, not the token file: a single-file bind mount keeps the old file after each rename.

FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY fake-kakao ./fake-kakao
# Without the demo: the image carries no fake provider.
RUN cargo build --release --locked --no-default-features --bin kakao-tokend \
    && install -d -m 0700 /out/var/lib/kakao-tokend

# distroless/cc: glibc, CA certificates and a "nonroot" user (65532), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kakao-tokend /usr/local/bin/kakao-tokend
COPY --from=build --chown=65532:65532 /out/var/lib/kakao-tokend /var/lib/kakao-tokend
USER 65532:65532
# The config is read from /etc/kakao-tokend/config.toml, the default path; mount it there.
VOLUME ["/var/lib/kakao-tokend"]
# Exit 0 when every account holds a valid access token.
HEALTHCHECK --interval=1m --timeout=10s --start-period=30s CMD ["/usr/local/bin/kakao-tokend", "status"]
ENTRYPOINT ["/usr/local/bin/kakao-tokend"]
CMD ["run"]
