#!/usr/bin/env bash
# Make the Docker backend usable on this machine. Idempotent; needs no stdin (CI).
#  1. install Debian's docker.io (and python3.11, which the offline image is made of) if
#     missing;
#  2. start dockerd in the background if `docker info` fails: no iptables, no bridge (the
#     sandbox containers run with network_mode=none), pidfile /run/sandbox-dockerd.pid,
#     log /var/log/sandbox-dockerd.log, gVisor registered as runtime "runsc" when it is
#     installed (apt-get install runsc); wait until `docker info` answers (60 s at most);
#  3. build the runner image offline (runner_images/build_offline.py: skipped when
#     sandbox-runner:<runtime key> is up to date) and tag it sandbox-runner:latest.
# Stop the engine it started with: kill "$(cat /run/sandbox-dockerd.pid)".
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PIDFILE=/run/sandbox-dockerd.pid
LOG=/var/log/sandbox-dockerd.log
WAIT_SECONDS=${SANDBOX_DOCKERD_WAIT:-60}
PY=${SANDBOX_PYTHON:-$REPO/.venv/bin/python}
say() { echo "docker-setup: $*"; }
die() { echo "docker-setup: $*" >&2; exit 1; }

# 1. packages -----------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
{ [ -x /usr/bin/python3.11 ] && [ -f /usr/lib/python3.11/os.py ]; } || need+=(python3.11)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${need[*]}; run as root (apt-get install ${need[*]})"
  command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get here"
  say "installing ${need[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" </dev/null >/dev/null
  say "installed ${need[*]}"
else
  say "docker.io present: $(dockerd --version 2>/dev/null || echo dockerd)"
fi

# 2. the engine ---------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
  say "the Docker engine already answers"
else
  pid=""
  started_pid=""
  [ -f "$PIDFILE" ] && pid=$(cat "$PIDFILE" 2>/dev/null || true)
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = dockerd ]; then
    say "dockerd (pid $pid) is running but not answering yet; waiting"
  else
    [ "$(id -u)" = 0 ] || die "the Docker engine is not running and starting it needs root"
    rm -f "$PIDFILE"  # stale: dockerd refuses a pidfile naming a live process
    extra=()
    runsc=$(command -v runsc 2>/dev/null || true)
    if [ -n "$runsc" ] && [ ! -e /etc/docker/daemon.json ]; then
      # gVisor installed (apt-get install runsc): offer it as runtime "runsc"; sandbox
      # containers never have a network, and gVisor's netstack needs --network=none there
      printf '{"runtimes": {"runsc": {"path": "%s", "runtimeArgs": ["--network=none"]}}}\n' \
        "$runsc" >/run/sandbox-dockerd.json
      extra+=(--config-file /run/sandbox-dockerd.json)
    fi
    say "starting dockerd ${extra[*]:+${extra[*]} }(pidfile $PIDFILE, log $LOG)"
    mkdir -p "$(dirname "$LOG")"
    setsid dockerd --iptables=false --ip6tables=false --bridge=none --pidfile "$PIDFILE" \
      "${extra[@]}" >>"$LOG" 2>&1 </dev/null &
    started_pid=$!
  fi
  deadline=$((SECONDS + WAIT_SECONDS))
  until docker info >/dev/null 2>&1; do
    if [ -n "$started_pid" ] && ! kill -0 "$started_pid" 2>/dev/null; then
      tail -n 20 "$LOG" >&2 || true
      die "dockerd exited at start (log: $LOG)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 20 "$LOG" >&2 || true
      die "the Docker engine did not answer within ${WAIT_SECONDS}s (log: $LOG)"
    fi
    sleep 0.5
  done
  say "the Docker engine answers (dockerd pid $(cat "$PIDFILE" 2>/dev/null || echo '?'))"
fi

# 3. the runner image ---------------------------------------------------------------------
[ -x "$PY" ] || die "$PY not found: create the project's venv first (make install)"
started=$SECONDS
image=$("$PY" "$REPO/runner_images/build_offline.py")
say "runner image $image ready ($((SECONDS - started))s): sandbox-runner:latest"
