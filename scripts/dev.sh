#!/usr/bin/env bash
# Sets up everything kvm-cpu-exporter needs on Debian 12 (as root), then runs it or tests it.
#   scripts/dev.sh run    set up, then run the exporter on its built-in defaults (:10437)
#   scripts/dev.sh test   set up, then run the whole test suite (ruff check + format --check, mypy, pytest)
#   scripts/dev.sh setup  only set up
#   scripts/dev.sh lock   regenerate requirements.lock (with hashes) after a dependency change in pyproject.toml
# Idempotent: a second run installs nothing new and reuses the built canary image.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
APT_PACKAGES=(
  python3 python3-venv python3-dev gcc
  qemu-system-x86 qemu-utils cryptsetup-bin busybox-static cpio kmod
  prometheus prometheus-node-exporter prometheus-alertmanager
  iproute2 openssl ca-certificates procps systemd
  chromium
)
#: the one command that regenerates requirements.lock; its header repeats it (tests/test_deploy.py checks)
LOCK_COMMAND=(pip-compile --allow-unsafe --generate-hashes --no-emit-find-links --no-emit-index-url
              --output-file=requirements.lock --strip-extras pyproject.toml)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

setup_apt() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d: packages such as prometheus must not start system services behind our back
    local own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      own_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
  fi
}

setup_venv() {
  local stamp="$VENV/.installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    log "creating virtualenv $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    # the runtime dependencies exactly as the container image installs them (hashes checked), so the
    # tests run what ships; then the package itself and the dev tools, which leave those pins alone
    "$VENV/bin/pip" install -q --require-hashes --no-deps -r requirements.lock
    "$VENV/bin/pip" install -q -e ".[dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
}

lock() {
  setup_venv
  "$VENV/bin/pip" install -q pip-tools
  log "regenerating requirements.lock from pyproject.toml (existing pins kept; add --upgrade to bump)"
  "$VENV/bin/${LOCK_COMMAND[0]}" --quiet "${LOCK_COMMAND[@]:1}" "$@"
}

setup_image() {
  log "building the canary guest image (cached)"
  if ! "$VENV/bin/kvm-cpu-exporter" canary build; then
    # the kernel comes from Debian's archive: stale or emptied apt lists are the usual cause
    log "canary build failed; refreshing apt lists and trying once more"
    apt-get update -qq
    "$VENV/bin/kvm-cpu-exporter" canary build
  fi
}

setup() { setup_apt; setup_venv; setup_image; }

case "${1:-}" in
  setup) setup ;;
  lock)
    shift
    lock "$@"
    ;;
  run)
    setup
    shift
    # exec: the exporter replaces this shell, so signals (Ctrl-C, timeout, systemd) reach it directly
    exec "$VENV/bin/kvm-cpu-exporter" serve "$@"
    ;;
  test)
    setup
    shift
    log "ruff (lint, complexity, format)"
    "$VENV/bin/ruff" check exporter tests bench grafana deploy
    "$VENV/bin/ruff" format --check .
    log "mypy"
    "$VENV/bin/mypy"
    log "pytest"
    exec "$VENV/bin/pytest" "$@"
    ;;
  *)
    echo "usage: $0 run|test|setup|lock" >&2
    exit 2
    ;;
esac
