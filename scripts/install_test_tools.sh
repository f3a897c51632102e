#!/usr/bin/env bash
# Tools the tests need that PyPI does not ship: promtool (Debian's prometheus package) checks
# deploy/prometheus, systemd-analyze (systemd) checks deploy/systemd. Installs only what is
# missing, through apt-get (as root, or with sudo); a no-op where both are present.
set -euo pipefail

missing=""
command -v promtool >/dev/null || missing="$missing prometheus"
command -v systemd-analyze >/dev/null || missing="$missing systemd"
[ -z "$missing" ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# A policy-rc.d that denies everything keeps the packages' maintainer scripts from starting
# a Prometheus server on this machine.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod 755 /usr/sbin/policy-rc.d
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
$sudo apt-get update -qq
# shellcheck disable=SC2086  # $missing is a list of package names
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
