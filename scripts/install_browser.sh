#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test of circuit.html (tests/test_viewer.py).
# Idempotent: does nothing when /usr/bin/chromium already runs. Needs no Python package: the test
# drives Chromium over --remote-debugging-pipe with the standard library only.
# Chromium's own "download a browser" tools (playwright install, puppeteer) cannot work on this closed
# network, so the browser comes from apt.
set -euo pipefail

if [ -x /usr/bin/chromium ] && /usr/bin/chromium --version >/dev/null 2>&1; then
  echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null) already installed"
  exit 0
fi

# Root runs apt directly; anyone else goes through sudo when it is there.
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_browser: not root and no sudo; cannot install chromium" >&2
    exit 1
  fi
fi

start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends keeps out desktop extras (upower, notification daemons, ...); a font package
# is asked for explicitly so screenshots have readable text.
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null) installed in $(( $(date +%s) - start )) s"
