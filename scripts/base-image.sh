#!/usr/bin/env bash
# Make the base image the Dockerfiles build FROM, from Debian's own packages, where no image registry is
# reachable: scripts/base-image.sh STORE [IMAGE]
#   debootstrap (minbase, bookworm, with Python 3.11, venv, pip and the CA certificates) from the Debian mirror
#   apt already uses (or $MIRROR), then `podman import` into the podman storage under STORE (scripts/podman.sh).
# IMAGE defaults to localhost/debian-py:bookworm. An image already there is kept; FORCE=1 makes it again.
# Needs root, debootstrap and podman (Debian: apt-get install podman debootstrap runc).
# Where a registry is reachable, skip this and build with --build-arg BASE=docker.io/library/python:3.11-slim-bookworm.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 STORE [IMAGE]" >&2; exit 2; }
store=$1
image=${2:-localhost/debian-py:bookworm}
here=$(cd "$(dirname "$0")" && pwd)
podman() { "$here/podman.sh" "$store" "$@"; }

if [ "${FORCE:-0}" != 1 ] && podman image exists "$image"; then
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (Debian: apt-get install debootstrap)" >&2; exit 127; }
[ "$(id -u)" -eq 0 ] || { echo "debootstrap needs root" >&2; exit 1; }

# The mirror apt uses: the first deb822 URIs line, else the first one-line `deb` entry, else Debian's CDN.
apt_mirror() {
  local uri
  uri=$(grep -hs -m1 -E '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -hs -E '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                         | grep -v security | awk '{print ($2 ~ /^\[/) ? $3 : $2}' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}
mirror=${MIRROR:-$(apt_mirror)}

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/asr-hub-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $mirror" >&2
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
  bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# No package caches or lists in the image: a later `apt-get update` fetches fresh ones.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import --quiet \
  --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' \
  --message "debootstrap --variant=minbase bookworm $mirror" - "$image" >/dev/null
echo "made $image" >&2
