#!/usr/bin/env bash
# Make sure what the test suite needs is present. Idempotent; safe without a TTY.
# - bubblewrap (the default sandbox) and SoftHSM2 (a real PKCS#11 token) from Debian;
# - headless Chromium and chromium-driver from Debian, for the web pages' browser test;
# - the Docker engine and the offline runner image (scripts/docker-setup.sh);
# - PostgreSQL is started by the machine; if it is down we try to start it here.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v bwrap >/dev/null 2>&1 || need_apt+=(bubblewrap)
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need_apt+=(softhsm2)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
    echo "test-setup: installed ${need_apt[*]}"
  else
    echo "test-setup: missing Debian packages: ${need_apt[*]} (tests needing them will skip," \
         "or fail under CI=true)" >&2
  fi
fi

# Headless Chromium and its WebDriver for the one browser test (tests/test_web_browser.py);
# without recommends: a browser, not a desktop.
need_browser=()
command -v chromium >/dev/null 2>&1 || need_browser+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_browser+=(chromium-driver)
if [ ${#need_browser[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq >/dev/null &&
       apt-get install -y -qq --no-install-recommends "${need_browser[@]}" >/dev/null; then
      echo "test-setup: installed ${need_browser[*]}"
    else
      echo "test-setup: could not install ${need_browser[*]} (the browser test will skip," \
           "or fail under CI=true)" >&2
    fi
  else
    echo "test-setup: missing Debian packages: ${need_browser[*]} (the browser test will" \
         "skip, or fail under CI=true)" >&2
  fi
fi

if [ -x scripts/docker-setup.sh ] && [ "$(id -u)" = 0 ]; then
  bash scripts/docker-setup.sh || echo "test-setup: docker setup failed (docker tests will" \
                                        "skip, or fail under CI=true)" >&2
fi

if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
fi
