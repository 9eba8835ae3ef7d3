#!/usr/bin/env bash
# System tools the tests use (not the server): promtool, from Debian's prometheus package.
set -euo pipefail
command -v promtool >/dev/null && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install_test_tools: promtool missing; install Debian's 'prometheus' package" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# the package starts a prometheus service where init runs; tests only need the binary
promtool --version | head -1
