#!/usr/bin/env bash
# Install the Debian packages listed in scripts/test-packages.txt that are missing, where this machine allows
# (root with apt-get). Never fails the build: a test that needs a package it cannot have skips with the reason.
set -u
list="$(dirname "$0")/test-packages.txt"
missing=()
while read -r pkg; do
  case "$pkg" in ""|\#*) continue ;; esac
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done < "$list"
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: not installing ${missing[*]} (needs root and apt-get); the tests that use them will be skipped" >&2
  exit 0
fi
echo "installing test packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
  echo "note: apt-get could not install ${missing[*]}; the tests that use them will be skipped" >&2
fi
exit 0
