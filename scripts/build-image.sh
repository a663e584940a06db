#!/usr/bin/env bash
# Build the CPU or the GPU image into the podman storage under STORE: scripts/build-image.sh cpu|cuda STORE [TAG]
#   BASE         the image to build FROM; default localhost/debian-py:bookworm, made by scripts/base-image.sh
#                when missing. Where a registry is reachable: BASE=docker.io/library/python:3.11-slim-bookworm.
#   CA_BUNDLE    the host's CA bundle (default: $SSL_CERT_FILE, else Debian's /etc/ssl/certs/ca-certificates.crt),
#                bind-mounted read-only over the container's bundle while the RUN steps run, so pip trusts
#                what the host trusts (an intercepting proxy's CA included); it never lands in a layer.
#                CA_BUNDLE=none builds with the base image's own bundle.
#   PIP_INDEX_URL  a PyPI mirror, where PyPI itself is not reachable from the build.
# TAG defaults to asr-hub:cpu or asr-hub:cuda, the names the Kubernetes overlays use.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 cpu|cuda STORE [TAG]" >&2; exit 2; }
flavour=$1 store=$2
case "$flavour" in
  cpu) dockerfile=deploy/Dockerfile ;;
  cuda) dockerfile=deploy/Dockerfile.cuda ;;
  *) echo "unknown image '$flavour': cpu or cuda" >&2; exit 2 ;;
esac
tag=${3:-asr-hub:$flavour}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
base=${BASE:-localhost/debian-py:bookworm}
[ "$base" != localhost/debian-py:bookworm ] || "$here/base-image.sh" "$store" "$base"

args=(build --file "$root/$dockerfile" --build-arg "BASE=$base" --tag "$tag")
[ -z "${PIP_INDEX_URL:-}" ] || args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
ca=${CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
if [ "$ca" != none ]; then
  [ -f "$ca" ] || { echo "CA bundle $ca not found: set CA_BUNDLE to the host's bundle, or CA_BUNDLE=none" >&2; exit 1; }
  args+=(--volume "$(readlink -f "$ca"):/etc/ssl/certs/ca-certificates.crt:ro")
fi
start=$(date +%s)
"$here/podman.sh" "$store" "${args[@]}" "$root"
size=$("$here/podman.sh" "$store" image inspect --format '{{.Size}}' "$tag")
echo "built $tag in $(( $(date +%s) - start )) s: $(( size / 1000000 )) MB, in the podman storage under $store" >&2
echo "run it: scripts/podman.sh $store run --rm -p 127.0.0.1:8000:8000 -v ./config.yaml:/etc/asr-hub/config.yaml:ro $tag" >&2
