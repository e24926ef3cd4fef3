#!/usr/bin/env bash
# A cached Debian 11 (bullseye, glibc 2.31: as old as Ubuntu 20.04) minbase root, for checking that
# the .deb from dist/build installs and runs there (tests/deb_bullseye.rs).
#
# Usage (as root):  tests/e2e/bullseye.sh prepare    builds the root once (~1 min), prints its path
#
# The root is never changed after it is built: tests copy it. Environment:
#   PMGUARD_BULLSEYE_CACHE   cache directory   (default /var/cache/pmguard-bullseye)
#   PMGUARD_E2E_MIRROR       Debian mirror     (default http://deb.debian.org/debian)
set -euo pipefail

SUITE=bullseye
CACHE=${PMGUARD_BULLSEYE_CACHE:-/var/cache/pmguard-bullseye}
MIRROR=${PMGUARD_E2E_MIRROR:-http://deb.debian.org/debian}
ROOT=$CACHE/root-$SUITE-minbase

die() { printf '[bullseye] error: %s\n' "$*" >&2; exit 1; }

prepare() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap needs it)"
    if [ -f "$ROOT/.pmguard-ready" ]; then
        echo "$ROOT"
        return 0
    fi
    mkdir -p "$CACHE/debs"
    exec 9>"$CACHE/lock"
    flock 9
    if [ -f "$ROOT/.pmguard-ready" ]; then
        echo "$ROOT"
        return 0
    fi
    if ! command -v debootstrap >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o DPkg::Lock::Timeout=300 debootstrap \
            || die "cannot install debootstrap (apt-get install debootstrap)"
    fi
    local build log
    build=$(mktemp -d "$CACHE/build.XXXXXX")
    log=$build.log
    printf '[bullseye] debootstrap --variant=minbase %s into %s (log %s)\n' "$SUITE" "$build" "$log" >&2
    if ! debootstrap --variant=minbase --cache-dir="$CACHE/debs" "$SUITE" "$build/root" "$MIRROR" >"$log" 2>&1; then
        tail -20 "$log" >&2
        rm -rf "$build"
        die "debootstrap $SUITE failed (log above; a mirror that dropped $SUITE? set PMGUARD_E2E_MIRROR)"
    fi
    touch "$build/root/.pmguard-ready"
    rm -rf "$ROOT"
    mv "$build/root" "$ROOT"
    rm -rf "$build" "$log"
    echo "$ROOT"
}

case "${1:-}" in
    prepare) prepare ;;
    *) die "usage: $0 prepare" ;;
esac
