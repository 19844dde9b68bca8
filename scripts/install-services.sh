#!/usr/bin/env bash
# Installs the real servers the tests start on loopback ports, from Debian's packages:
#   prometheus (with promtool)  tests/deploy/test_monitoring.py, tests/e2e/test_prometheus.py
#   redis-server                tests/e2e/test_rate_limits.py (limits shared by replicas)
# Idempotent: when every tool is already on PATH it only says so. Needs root (as CI and the
# developers' machines are).
#
#   scripts/install-services.sh
#
# The packages' maintainer scripts would start their services; a policy-rc.d that denies every
# start keeps the install from launching a server (there is no init system here anyway).
set -euo pipefail

missing=""
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing="prometheus"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
if [ -z "$missing" ]; then
  echo "install-services: prometheus, promtool and redis-server already present"
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
# shellcheck disable=SC2086  # $missing is a list of package names
apt-get install -y -qq --no-install-recommends $missing >/dev/null

echo "install-services: installed$missing ($(redis-server --version | cut -d" " -f1-3); $(prometheus --version 2>&1 | head -n 1))"
