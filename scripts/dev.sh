#!/usr/bin/env bash
# Sets up everything kvm-cpu-exporter needs on Debian 12 (as root), then runs it or tests it.
#   scripts/dev.sh run    set up, then run the exporter on its built-in defaults (:10437)
#   scripts/dev.sh test   set up, then run the whole test suite (ruff check + format --check, mypy, pytest)
#   scripts/dev.sh setup  only set up
#   scripts/dev.sh lock   regenerate requirements.lock (with hashes) after a dependency change in pyproject.toml
#   scripts/dev.sh package [OUTDIR]  build the sdist, the wheel and the Debian package into OUTDIR (dist/)
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
  dh-virtualenv debhelper dpkg-dev
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

# `kvm-cpu-exporter` on PATH, as README and docs write it: a link to the dev venv's entry point
# (never over a real file, e.g. an installed package's)
setup_path() {
  local link=${KVMCPU_PATH_LINK:-/usr/local/bin/kvm-cpu-exporter}
  if [ ! -e "$link" ] || [ -L "$link" ]; then
    ln -sfn "$VENV/bin/kvm-cpu-exporter" "$link"
  fi
}

setup() { setup_apt; setup_venv; setup_path; setup_image; }

# The sdist and the wheel (python -m build: the wheel is built from the sdist, which proves the sdist
# complete), then the Debian package, built by dpkg-buildpackage in the unpacked sdist: dh-virtualenv
# installs requirements.lock plus that very wheel, every file hash-checked (debian/rules).
# KVMCPU_DEV_PYTHON=PYTHON uses that interpreter (with `build` installed) instead of setting up .venv.
package() {
  local out=${1:-$ROOT/dist}
  local python=${KVMCPU_DEV_PYTHON:-}
  setup_apt
  if [ -z "$python" ]; then
    setup_venv
    python=$VENV/bin/python
  fi
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  local version
  version=$("$python" -c 'import re,sys; print(re.search(r"__version__ = \"(.+)\"", open("exporter/__init__.py").read())[1])')
  local deb_version
  deb_version=$(dpkg-parsechangelog -S Version)
  if [ "${deb_version%-*}" != "$version" ]; then
    echo "debian/changelog is at $deb_version but the exporter is $version: add a changelog entry (dch -v $version-1)" >&2
    exit 1
  fi
  local work
  mkdir -p "$ROOT/tmp"
  work=$(mktemp -d "$ROOT/tmp/package.XXXXXX")
  # built from a copy of the tree (tracked and new files, not ignored ones such as .venv): the
  # checkout gets no egg-info and no BUILD_INFO, and keeps reporting git's revision
  mkdir "$work/tree"
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$work/tree"
  else
    tar --exclude=./.venv --exclude=./tmp --exclude=./dist -cf - . | tar -xf - -C "$work/tree"
  fi
  # the revision and date --version reports (exporter/version.py)
  printf 'revision=%s\ndate=%s\n' "$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    "$(git log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)" > "$work/tree/exporter/BUILD_INFO"
  rm -f "$out"/kvm_cpu_exporter-"$version"* "$out"/kvm-cpu-exporter_"$version"*
  log "building the sdist and the wheel into $out"
  (cd "$work/tree" && "$python" -m build --outdir "$out" .)
  tar -xzf "$out/kvm_cpu_exporter-$version.tar.gz" -C "$work"
  local src=$work/kvm_cpu_exporter-$version
  mkdir -p "$src/dist"
  cp "$out/kvm_cpu_exporter-$version-py3-none-any.whl" "$src/dist/"
  log "building the Debian package (dh-virtualenv, from requirements.lock)"
  if ! (cd "$src" && dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1); then
    tail -40 "$work/build.log" >&2
    echo "dpkg-buildpackage failed; full log: $work/build.log" >&2
    exit 1
  fi
  mv "$work"/*.deb "$out/"
  rm -rf "$work"
  ls -1 "$out"/kvm_cpu_exporter-"$version"* "$out"/kvm-cpu-exporter_"$version"*
}

case "${1:-}" in
  setup) setup ;;
  lock)
    shift
    lock "$@"
    ;;
  package)
    shift
    package "$@"
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
    echo "usage: $0 run|test|setup|lock|package [OUTDIR]" >&2
    exit 2
    ;;
esac
