#!/usr/bin/env bash
# Installs Prometheus and promtool from Debian's `prometheus` package, for the monitoring tests
# (tests/test_deploy_monitoring.py, tests/e2e/test_prometheus.py). Idempotent: when both tools
# are already on PATH it only says so. Needs root (as CI and the developers' machines are).
#
#   scripts/install-prometheus.sh
#
# The package's maintainer scripts would start a `prometheus` service; a policy-rc.d that denies
# every start keeps the install from launching a server (there is no init system here anyway).
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  echo "install-prometheus: already present ($(command -v promtool))"
  exit 0
fi

policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  made_policy=1
fi
cleanup() { if [ -n "$made_policy" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null

echo "install-prometheus: installed $(prometheus --version 2>&1 | head -n 1)"
