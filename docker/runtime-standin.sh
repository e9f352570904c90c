#!/usr/bin/env bash
# Makes a local stand-in for the image's runtime base (gcr.io/distroless/cc-debian12:nonroot) from
# Debian's own packages, for machines that reach no container registry:
#   glibc and libgcc_s (libc6, libgcc-s1), the Mozilla CA bundle (ca-certificates), passwd and group
#   files with the non-root user 65532, and nothing else: no shell, no package manager.
# Usage: docker/runtime-standin.sh [IMAGE]   (default kakao-tokend-runtime:standin)
# The image is made once; pass --force to make it again.
set -euo pipefail

force=false
if [ "${1:-}" = "--force" ]; then force=true; shift; fi
image=${1:-kakao-tokend-runtime:standin}

if ! $force && docker image inspect "$image" >/dev/null 2>&1; then
  echo "runtime stand-in $image exists"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
packages=(libc6 libgcc-s1 ca-certificates)
# apt-get download needs package lists; a fresh machine may have none yet.
if ! apt-get download "${packages[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get download "${packages[@]}"
fi

root=$work/root
mkdir "$root"
for deb in ./*.deb; do
  dpkg -x "$deb" "$root"
done

# dpkg -x runs no maintainer scripts, so the bundle update-ca-certificates would make is made here.
install -d "$root/etc/ssl/certs"
cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$root/etc/ssl/certs/ca-certificates.crt"
if [ "$(grep -c 'BEGIN CERTIFICATE' "$root/etc/ssl/certs/ca-certificates.crt")" -lt 100 ]; then
  echo "the CA bundle holds too few certificates" >&2
  exit 1
fi

# What a daemon never uses: iconv modules, docs, the CA sources and the shell script that bundles them.
rm -rf "$root/usr/lib/x86_64-linux-gnu/gconv" "$root/usr/share/doc" "$root/usr/share/man" \
  "$root/usr/share/lintian" "$root/usr/share/ca-certificates" "$root/usr/sbin" "$root/etc/ca-certificates.conf"

# Users as distroless names them: root, and nonroot (65532) whose home exists.
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
GROUP
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"
install -d -m 0700 "$root/root"
install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
install -d -m 1777 "$root/tmp"
install -d -m 0755 "$root/var/lib"

tar --numeric-owner -C "$root" -c . | docker import \
  --message "kakao-tokend runtime stand-in: glibc, libgcc_s, CA certificates, nonroot (65532), from Debian packages" \
  - "$image" >/dev/null
echo "runtime stand-in $image made ($(docker image inspect -f '{{.Size}}' "$image") bytes)"
