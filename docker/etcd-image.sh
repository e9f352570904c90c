#!/usr/bin/env bash
# Makes an etcd image from Debian's own packages, for the replica tests and for trying replicas on a
# machine that reaches no container registry: etcd and etcdctl (Debian's etcd-server and etcd-client,
# which link only glibc) on the runtime stand-in (docker/runtime-standin.sh).
# Usage: docker/etcd-image.sh [IMAGE]   (default kakao-tokend-etcd:local)
# The image is made once; pass --force to make it again.
set -euo pipefail
cd "$(dirname "$0")/.."

force=false
if [ "${1:-}" = "--force" ]; then force=true; shift; fi
image=${1:-kakao-tokend-etcd:local}
standin=kakao-tokend-runtime:standin

if ! $force && docker image inspect "$image" >/dev/null 2>&1; then
  echo "etcd image $image exists"
  exit 0
fi
docker/runtime-standin.sh "$standin" >/dev/null

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
packages=(etcd-server etcd-client)
if ! apt-get download "${packages[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get download "${packages[@]}"
fi
for deb in ./*.deb; do
  dpkg -x "$deb" root
done
install -D -m 0755 root/usr/bin/etcd ctx/etcd
install -D -m 0755 root/usr/bin/etcdctl ctx/etcdctl
cat >ctx/Dockerfile <<DOCKERFILE
FROM $standin
COPY etcd etcdctl /usr/local/bin/
ENV ETCDCTL_API=3
ENTRYPOINT ["/usr/local/bin/etcd"]
DOCKERFILE
docker build --quiet -t "$image" ctx >/dev/null
echo "etcd image $image made ($(docker image inspect -f '{{.Size}}' "$image") bytes, $(docker run --rm "$image" --version | head -1))"
