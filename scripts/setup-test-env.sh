#!/usr/bin/env bash
# Installs what the end-to-end tests talk to, idempotently:
#   - redis-server (Debian's package) when missing; tests start their own on a free loopback port;
#   - nginx and haproxy (Debian's packages) when missing: the shipped site cache and router
#     configurations (deploy/) run in the tests as they ship;
#   - nftables (Debian's package) when missing and running as root;
#   - Debian's chromium and chromium-driver when missing and running as root (the operator page's
#     browser test; it skips without them);
#   - a Python venv with the official `openai` client, Selenium and schemathesis (the API
#     conformance test) at $EDGEPROMPT_HOME/venv-e2e (reused across runs).
# Prints the venv's python on stdout.
set -euo pipefail
home="${EDGEPROMPT_HOME:-$HOME/.cache/edgeprompt}"
OPENAI_VERSION="3.51.0"
SELENIUM_VERSION="4.27.1"
SCHEMATHESIS_VERSION="4.32.5"
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (Debian package)..." >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2
  else
    sudo apt-get update -qq >&2 && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2
  fi
fi
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)..." >&2
  if [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
      || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; }
  else
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
      || { sudo apt-get update -qq >&2 && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; }
  fi
fi
# nftables: the emulated links' random drops and the link-cut test (as root only; the tests that
# need namespaces skip without root, and the link emulator drops packets itself without nft).
if [ "$(id -u)" -eq 0 ] && ! command -v nft >/dev/null 2>&1; then
  echo "installing nftables (Debian package)..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >&2 || echo "nftables not installed" >&2
fi
if [ "$(id -u)" -eq 0 ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  echo "installing chromium and chromium-driver (Debian packages)..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2 \
    || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2; } \
    || echo "chromium not installed: the browser test will skip" >&2
fi
venv="$home/venv-e2e"
want="import openai, selenium, sys; from importlib.metadata import version; \
sys.exit(0 if (openai.__version__, selenium.__version__, version('schemathesis')) \
== ('$OPENAI_VERSION', '$SELENIUM_VERSION', '$SCHEMATHESIS_VERSION') else 1)"
if ! "$venv/bin/python" -c "$want" >/dev/null 2>&1; then
  echo "setting up $venv with openai==$OPENAI_VERSION selenium==$SELENIUM_VERSION" \
    "schemathesis==$SCHEMATHESIS_VERSION..." >&2
  mkdir -p "$home"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "openai==$OPENAI_VERSION" "selenium==$SELENIUM_VERSION" \
    "schemathesis==$SCHEMATHESIS_VERSION" >&2
fi
echo "$venv/bin/python"
