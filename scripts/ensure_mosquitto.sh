#!/usr/bin/env bash
# Makes sure a Mosquitto >= 2 binary exists. Installs Debian's package when running as root;
# otherwise says how to install it. Tests and the demo start their own broker from this binary
# on a loopback port, so no system service is started or needed.
set -euo pipefail

find_mosquitto() {
  if [ -n "${SPAR_MOSQUITTO:-}" ] && [ -x "${SPAR_MOSQUITTO}" ]; then echo "$SPAR_MOSQUITTO"; return 0; fi
  for candidate in "$(command -v mosquitto 2>/dev/null || true)" /usr/sbin/mosquitto /usr/local/sbin/mosquitto /opt/homebrew/sbin/mosquitto; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  return 1
}

if bin=$(find_mosquitto); then
  exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "mosquitto not found: installing Debian package 'mosquitto' with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q mosquitto >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q mosquitto >/dev/null; }
  # Debian's package may start a system broker on port 1883; we never use it, but stop it
  # so it does not hold resources on a CI box.
  (command -v service >/dev/null 2>&1 && service mosquitto stop >/dev/null 2>&1) || true
  if bin=$(find_mosquitto); then
    echo "installed $("$bin" -h 2>/dev/null | head -1)" >&2
    exit 0
  fi
fi

cat >&2 <<'MSG'
error: Mosquitto (MQTT broker, version 2 or newer) is not installed and could not be installed.
  Debian/Ubuntu/Jetson:  sudo apt-get install mosquitto
  Fedora:                sudo dnf install mosquitto
  macOS:                 brew install mosquitto
Or point SPAR_MOSQUITTO at a mosquitto binary.
MSG
exit 1
