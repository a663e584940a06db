#!/usr/bin/env bash
# Run podman with its storage and its settings under one directory: scripts/podman.sh STORE ARGS...
# STORE (created if missing) holds storage.conf (graphroot and runroot inside STORE, so removing STORE
# removes every image and container made through it) and containers.conf with the settings containers
# need on hosts like the development machine: runc (crun fails on hybrid cgroups), cgroupfs, a file
# events log, and explicit ulimits (a container may not raise its own limits there).
# Every podman call of the project goes through here: `make image`, scripts/base-image.sh and
# tests/system/test_image.py.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 STORE [podman args...]" >&2; exit 2; }
store=$(mkdir -p "$1" && cd "$1" && pwd)
shift
command -v podman >/dev/null || { echo "podman is not installed (Debian: apt-get install podman runc)" >&2; exit 127; }
if [ ! -f "$store/storage.conf" ]; then
  cat >"$store/storage.conf.tmp" <<CONF
[storage]
driver = "overlay"
graphroot = "$store/graph"
runroot = "$store/run"
CONF
  mv "$store/storage.conf.tmp" "$store/storage.conf"
fi
if [ ! -f "$store/containers.conf" ]; then
  cat >"$store/containers.conf.tmp" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$store/run/events.log"
tmp_dir = "$store/run/libpod"
CONF
  mv "$store/containers.conf.tmp" "$store/containers.conf"
fi
export CONTAINERS_STORAGE_CONF="$store/storage.conf" CONTAINERS_CONF="$store/containers.conf"
exec podman "$@"
