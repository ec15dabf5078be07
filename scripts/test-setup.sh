#!/usr/bin/env bash
# Make sure what the test suite needs is present. Idempotent; safe without a TTY.
# - PostgreSQL is started by the machine; if it is down we try to start it here.
# - SoftHSM2 (a real PKCS#11 token for the HSM key provider tests) from Debian.
set -euo pipefail

need_apt=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need_apt+=(softhsm2)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "test-setup: missing Debian packages: ${need_apt[*]} (tests needing them will skip," \
         "or fail under CI=true)" >&2
  fi
fi

if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
fi
