#!/usr/bin/env bash
# Makes sure a Chromium exists for the dashboard's browser test (tests/edge_runtime/
# test_dashboard_browser.py). Installs Debian's package when running as root; otherwise the test
# skips with a reason. Never fails the build: a box without a browser still runs every other test.
set -uo pipefail

for candidate in chromium chromium-browser google-chrome; do
  if command -v "$candidate" >/dev/null 2>&1; then exit 0; fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "chromium not found: installing Debian package 'chromium' with apt-get (the dashboard's browser test)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
    || echo "note: chromium could not be installed; the dashboard's browser test will skip" >&2
else
  echo "note: no chromium; the dashboard's browser test will skip (sudo apt-get install chromium)" >&2
fi
exit 0
