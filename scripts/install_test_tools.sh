#!/usr/bin/env bash
# System tools the tests and `make serve-replicas` use (not the server itself), from Debian:
# promtool (package prometheus) checks the Prometheus config; nginx (package nginx-light) is
# the replicas' gateway (deploy/gateway/nginx.conf).
set -euo pipefail
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install_test_tools: missing Debian packages: ${missing[*]} (install them as root)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# the packages start their services where init runs; tests only need the binaries
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v promtool >/dev/null && promtool --version | head -1
/usr/sbin/nginx -v
