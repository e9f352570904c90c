#!/usr/bin/env bash
# Builds the kakao-tokend image with no registry: the binary is built on this machine (release, without
# the demo, static, stripped), the runtime base is a stand-in made from Debian's packages
# (docker/runtime-standin.sh), and the repository's own Dockerfile puts them together at its
# from-host-binary stage. The fake provider's binary is built too, for the container tests and the
# compose override that run it: a debug build (target/debug/fake-kakao), which shares its compiled
# dependencies with `cargo test` instead of a second release build.
# Usage: docker/build-image.sh [TAG]   (default kakao-tokend:latest)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-kakao-tokend:latest}
standin=kakao-tokend-runtime:standin

# Two builds, so that the shipped binary is built with exactly its own features. The shipped one is
# linked statically against glibc, whose static library has the `files` and `dns` name services built
# in (all the image has): no shared library is mapped, and one idle account is resident in 5.7 MiB
# (BENCHMARKS.md, "One account in 6 MiB"). Static linking needs an explicit target, so that build
# scripts and proc macros stay dynamic.
host=$(rustc --print host-tuple)
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --no-default-features -p kakao-tokend --bin kakao-tokend --target "$host"
cargo build --locked -p fake-kakao --bin fake-kakao

# The build context's only part of target/: what .dockerignore lets through.
rm -rf target/docker
install -d target/docker/bin
install -d -m 0750 target/docker/lib/kakao-tokend
install -m 0755 "target/$host/release/kakao-tokend" target/docker/bin/kakao-tokend

docker/runtime-standin.sh "$standin"
docker build --quiet --target from-host-binary --build-arg "RUNTIME_IMAGE=$standin" -t "$tag" . >/dev/null
echo "image $tag built ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
