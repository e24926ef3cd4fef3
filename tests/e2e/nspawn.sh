#!/usr/bin/env bash
# pmguard end-to-end harness: a booted Debian 12 with a real systemd (PID 1 in a systemd-nspawn
# container), node, PM2 and a sample app under pm2-ubuntu.service.
#
# Usage (as root):  tests/e2e/nspawn.sh COMMAND [ARGS...]
#   prepare                     host packages + cached Debian root (debootstrap, PM2, user ubuntu)
#   boot NAME                   boot a fresh copy of the cached root as machine NAME
#   exec NAME CMD...            run CMD inside as root (exit code propagated)
#   exec-as NAME USER CMD...    run CMD inside as USER (login-like env, cwd = home)
#   copy-in NAME SRC DEST       copy a host file or directory to DEST inside (root-owned, atomic)
#   setup-app NAME              sample app "codebox" on 127.0.0.1:5000 under pm2-ubuntu.service
#   status NAME                 print the machine's state (dir, pids); exit 1 if not running
#   teardown NAME               stop the machine, remove its files (safe to repeat)
#   teardown-all                teardown of every machine this host has state for
#   selftest                    all of the above, timed
#
# Can also be sourced (`source tests/e2e/nspawn.sh`): the e2e_* functions are then available and
# nothing runs. Environment:
#   PMGUARD_E2E_CACHE    cached root           (default /var/cache/pmguard-e2e)
#   PMGUARD_E2E_RUN      per-machine state     (default /run/pmguard-e2e)
#   PMGUARD_E2E_TMP      per-machine root dirs (default /var/tmp)
#   PMGUARD_E2E_MIRROR   Debian mirror         (default http://deb.debian.org/debian)
#   PMGUARD_E2E_NETWORK  private | host        (default private: own loopback, no port clashes)
#   PMGUARD_E2E_SNAPSHOT overlay | copy        (default overlay, falls back to copy)
#   PMGUARD_E2E_BOOT_TIMEOUT seconds           (default 120)
set -euo pipefail

E2E_SUITE=bookworm
E2E_PACKAGES=systemd,systemd-sysv,dbus,ca-certificates,cron,logrotate,procps,curl,nodejs
E2E_PM2_VERSION=7.0.4
E2E_USER=ubuntu
E2E_UID=1000
E2E_APP_PORT=5000

E2E_CACHE=${PMGUARD_E2E_CACHE:-/var/cache/pmguard-e2e}
E2E_RUN=${PMGUARD_E2E_RUN:-/run/pmguard-e2e}
E2E_TMP=${PMGUARD_E2E_TMP:-/var/tmp}
E2E_MIRROR=${PMGUARD_E2E_MIRROR:-http://deb.debian.org/debian}
E2E_NETWORK=${PMGUARD_E2E_NETWORK:-private}
E2E_SNAPSHOT=${PMGUARD_E2E_SNAPSHOT:-overlay}
E2E_BOOT_TIMEOUT=${PMGUARD_E2E_BOOT_TIMEOUT:-120}
E2E_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
E2E_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

e2e_log() { printf '[e2e] %s\n' "$*" >&2; }
e2e_die() { printf '[e2e] error: %s\n' "$*" >&2; exit 1; }

e2e_need_root() {
    [ "$(id -u)" -eq 0 ] || e2e_die "must run as root (debootstrap, systemd-nspawn, nsenter need it)"
}

e2e_check_name() {
    [[ ${1:-} =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$ ]] \
        || e2e_die "machine name '${1:-}' must match [A-Za-z0-9][A-Za-z0-9_-]{0,62}"
}

# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------

# Installs systemd-container and debootstrap if missing. systemd-container is pinned to the host's
# systemd version when the archive still has it, so the host's systemd is not upgraded as a side
# effect. `apt-get update` only runs if the first install attempt fails (fresh CI image without
# lists, or lists naming versions the mirror no longer has).
e2e_host_packages() {
    local want=() pkg
    command -v systemd-nspawn >/dev/null || want+=(systemd-container)
    command -v debootstrap >/dev/null || want+=(debootstrap)
    [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || want+=(debian-archive-keyring)
    command -v gpgv >/dev/null || want+=(gpgv)
    command -v nsenter >/dev/null || want+=(util-linux)
    [ ${#want[@]} -eq 0 ] && return 0
    e2e_log "installing host packages: ${want[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local pinned=() sysver
    sysver=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null || true)
    for pkg in "${want[@]}"; do
        if [ "$pkg" = systemd-container ] && [ -n "$sysver" ]; then
            pinned+=("systemd-container=$sysver")
        else
            pinned+=("$pkg")
        fi
    done
    local apt=(apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold
        -o DPkg::Lock::Timeout=300)
    "${apt[@]}" "${pinned[@]}" && return 0
    "${apt[@]}" "${want[@]}" && return 0
    e2e_log "install failed; running apt-get update once"
    apt-get update -q -o DPkg::Lock::Timeout=300 || e2e_log "apt-get update reported errors (unreachable third-party lists?); trying anyway"
    "${apt[@]}" "${pinned[@]}" || "${apt[@]}" "${want[@]}" \
        || e2e_die "could not install ${want[*]} (see apt output above)"
}

# What the cached root is made of. Any change to it (package list, PM2 version, the
# customisation code below) changes the stamp, so a stale root is rebuilt, not reused.
e2e_stamp() {
    {
        echo "suite=$E2E_SUITE packages=$E2E_PACKAGES pm2=$E2E_PM2_VERSION user=$E2E_USER:$E2E_UID"
        declare -f e2e_customize_root e2e_install_pm2
    } | sha256sum | cut -c1-16
}

# Echoes the path of the ready root for the current stamp (it may not exist yet).
e2e_root_path() { echo "$E2E_CACHE/root-$(e2e_stamp)"; }

# PM2 inside the root. Debian's nodejs 18 ships without npm (the `npm` package drags ~300 node-*
# packages in), so PM2 is installed by the host: the host's global pm2 is copied when it is exactly
# $E2E_PM2_VERSION (no network), else the host's npm installs it from the registry with
# --prefix into the root. PM2 is pure JavaScript (no .node addons; checked below) and needs
# node >= 18, so the same tree runs on the container's node 18.
e2e_install_pm2() {
    local root=$1 host_root="" have=""
    if command -v npm >/dev/null; then host_root=$(npm root -g 2>/dev/null || true); fi
    [ -n "$host_root" ] || host_root=/usr/lib/node_modules
    # Read the version from package.json: never run `pm2 --version`, it starts a PM2 daemon.
    if [ -f "$host_root/pm2/package.json" ] && command -v node >/dev/null; then
        have=$(node -p 'require(process.argv[1]).version' "$host_root/pm2/package.json" 2>/dev/null || true)
    fi
    mkdir -p "$root/usr/local/lib/node_modules" "$root/usr/local/bin"
    if [ "$have" = "$E2E_PM2_VERSION" ]; then
        e2e_log "PM2 $E2E_PM2_VERSION: copying the host's $host_root/pm2"
        cp -a "$host_root/pm2" "$root/usr/local/lib/node_modules/pm2"
    elif command -v npm >/dev/null; then
        e2e_log "PM2 $E2E_PM2_VERSION: npm install into the root (host has '${have:-none}')"
        npm install -g --prefix "$root/usr/local" --no-audit --no-fund --loglevel=error \
            "pm2@$E2E_PM2_VERSION" >&2
    else
        e2e_die "need PM2 $E2E_PM2_VERSION: install it on the host (npm install -g pm2@$E2E_PM2_VERSION) or provide npm"
    fi
    ln -sfn ../lib/node_modules/pm2/bin/pm2 "$root/usr/local/bin/pm2"
    if find "$root/usr/local/lib/node_modules/pm2" -name '*.node' | grep -q .; then
        e2e_die "PM2 tree contains native addons; it would not be portable to the container's node"
    fi
}

# Runs inside the build (chroot, not booted). Keep it deterministic: its text is in the stamp.
e2e_customize_root() {
    local root=$1
    chroot "$root" /usr/sbin/useradd --uid "$E2E_UID" --user-group --create-home \
        --home-dir "/home/$E2E_USER" --shell /bin/bash "$E2E_USER"
    echo pmguard-e2e >"$root/etc/hostname"
    # A fresh id per boot (nspawn passes one in); a shared baked-in id would be identical in
    # every copy.
    : >"$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id"
    # Units that only fail or wait in a container without hardware or network config.
    local unit
    for unit in systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
        e2scrub_all.timer e2scrub_reap.service fstrim.timer; do
        ln -sfn /dev/null "$root/etc/systemd/system/$unit"
    done
    # journald: keep it small and in memory; the test reads it with journalctl while running.
    mkdir -p "$root/etc/systemd/journald.conf.d"
    printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n' \
        >"$root/etc/systemd/journald.conf.d/pmguard-e2e.conf"
    # Smoke: node runs and PM2's code loads on it (without starting a PM2 daemon).
    chroot "$root" /usr/bin/env -i PATH="$E2E_PATH" HOME=/root node -e '
        const v = require("/usr/local/lib/node_modules/pm2/package.json").version;
        require("/usr/local/lib/node_modules/pm2/lib/API.js");
        console.log("node " + process.version + ", pm2 " + v);' >&2
    rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"* "$root/tmp/"*
}

# Unmounts everything mounted at or below DIR, deepest first. debootstrap mounts proc and sysfs
# in the target while it runs; a build killed mid-way leaves them mounted, and `rm -rf` must
# never walk into them.
e2e_umount_tree() {
    local dir=$1 m
    awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo \
        | sort -r | while read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m" || true
        done
}

e2e_rm_tree() {
    e2e_umount_tree "$1"
    rm -rf --one-file-system "$1"
}

e2e_prepare() {
    e2e_need_root
    mkdir -p "$E2E_CACHE" "$E2E_CACHE/debs"
    local root lockfd
    root=$(e2e_root_path)
    # One prepare at a time (parallel tests). The lock is inherited by debootstrap: if this
    # script is killed, the next prepare waits for the orphaned build to end before removing it.
    exec {lockfd}>"$E2E_CACHE/lock"
    flock "$lockfd"
    e2e_host_packages
    if [ -f "$root/.pmguard-e2e-stamp" ]; then
        e2e_log "cached root: $root"
        e2e_gc_roots "$root"
        exec {lockfd}>&-
        return 0
    fi
    # Interrupted builds are never reused: only a complete build is renamed to root-<stamp>.
    local old
    for old in "$E2E_CACHE"/build.*; do
        [ -e "$old" ] || continue
        e2e_log "removing interrupted build $old"
        e2e_rm_tree "$old"
    done
    local build
    build=$(mktemp -d "$E2E_CACHE/build.XXXXXX")
    local attempt log="$build.log"
    for attempt in 1 2; do
        e2e_log "debootstrap $E2E_SUITE into $build/root (attempt $attempt, log $log)"
        e2e_rm_tree "$build/root"
        if debootstrap --variant=minbase --include="$E2E_PACKAGES" --cache-dir="$E2E_CACHE/debs" \
            "$E2E_SUITE" "$build/root" "$E2E_MIRROR" >"$log" 2>&1; then
            break
        fi
        tail -n 30 "$log" >&2
        [ "$attempt" = 2 ] && { e2e_rm_tree "$build"; e2e_die "debootstrap failed twice (log above: $log)"; }
    done
    e2e_install_pm2 "$build/root"
    e2e_customize_root "$build/root"
    e2e_stamp >"$build/root/.pmguard-e2e-stamp"
    e2e_umount_tree "$build/root"
    mv -T "$build/root" "$root"
    rm -rf "$build" "$log"
    e2e_log "cached root ready: $root"
    e2e_gc_roots "$root"
    exec {lockfd}>&-
}

# Removes roots of other stamps that no running machine uses (overlay lower dirs stay mounted).
e2e_gc_roots() {
    local keep=$1 d
    for d in "$E2E_CACHE"/root-*; do
        [ -d "$d" ] && [ "$d" != "$keep" ] || continue
        if grep -qF "lowerdir=$d" /proc/self/mountinfo; then continue; fi
        e2e_log "removing stale cached root $d"
        e2e_rm_tree "$d"
    done
}

# ---------------------------------------------------------------------------------------------
# machines
# ---------------------------------------------------------------------------------------------

e2e_state_file() { echo "$E2E_RUN/$1.state"; }

# The cgroup hierarchies systemd-nspawn uses: cgroup2 at /sys/fs/cgroup (unified), or the
# name=systemd v1 hierarchy plus /sys/fs/cgroup/unified (hybrid, as on the build machines).
e2e_cgroup_roots() {
    if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
        echo /sys/fs/cgroup
        return
    fi
    local d
    for d in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do
        mountpoint -q "$d" && echo "$d"
    done
}

# Without systemd as the host's PID 1, nspawn --keep-unit puts the container under
# <its own cgroup>/payload. Every machine started from the same cgroup would share that
# subtree (two containers' systemd managing one init.scope and system.slice), so each nspawn
# is started in a cgroup of its own: pmguard-e2e/<machine dir name> in every hierarchy.
e2e_cgroup_create() {
    local rel=$1 root
    for root in $(e2e_cgroup_roots); do
        mkdir -p "$root/$rel"
    done
}

e2e_cgroup_enter() {
    local rel=$1 root
    for root in $(e2e_cgroup_roots); do
        echo "$BASHPID" >"$root/$rel/cgroup.procs"
    done
}

# Removes the machine's cgroups (rmdir only: a cgroup that still has processes stays).
e2e_cgroup_remove() {
    local rel=$1 root
    [ -n "$rel" ] || return 0
    for root in $(e2e_cgroup_roots); do
        [ -d "$root/$rel" ] || continue
        find "$root/$rel" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [ ! -d "$root/$rel" ] || e2e_log "warning: cgroup $root/$rel still has processes"
    done
}

# Loads DIR, NSPAWN_PID, NSPAWN_START, LEADER, ROOT, MODE, LOG of machine $1 into the caller.
e2e_load() {
    local f
    f=$(e2e_state_file "$1")
    [ -f "$f" ] || return 1
    # shellcheck disable=SC1090
    source "$f"
}

e2e_proc_start() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }

# True if the nspawn process recorded for the machine is still that same process.
e2e_nspawn_alive() {
    [ -n "${NSPAWN_PID:-}" ] && [ -d "/proc/$NSPAWN_PID" ] \
        && [ "$(e2e_proc_start "$NSPAWN_PID")" = "$NSPAWN_START" ]
}

# The container's PID 1: the descendant of nspawn whose innermost pid is 1.
e2e_find_leader() {
    local parent=$1 child nspid
    for child in $(pgrep -P "$parent" || true); do
        nspid=$(awk '/^NSpid:/ {print $NF}' "/proc/$child/status" 2>/dev/null || true)
        if [ "$nspid" = 1 ]; then echo "$child"; return 0; fi
        e2e_find_leader "$child" && return 0
    done
    return 1
}

e2e_require_running() {
    e2e_check_name "$1"
    e2e_load "$1" || e2e_die "machine $1 is not booted (no $(e2e_state_file "$1")); run: boot $1"
    e2e_nspawn_alive || e2e_die "machine $1 is not running any more (console log: $LOG)"
    [ -d "/proc/$LEADER" ] || e2e_die "machine $1: leader $LEADER is gone"
}

# nsenter into every namespace of the container, with a clean environment.
e2e_nsenter() {
    nsenter -t "$LEADER" -a -- /usr/bin/env -i PATH="$E2E_PATH" LANG=C.UTF-8 \
        TERM="${TERM:-dumb}" SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

e2e_boot() {
    e2e_need_root
    local name=${1:-}
    e2e_check_name "$name"
    if e2e_load "$name"; then
        if e2e_nspawn_alive; then
            e2e_log "machine $name already running (dir $DIR, leader $LEADER)"
            echo "$DIR"
            return 0
        fi
        e2e_log "machine $name: stale state from a dead run; cleaning up"
        e2e_teardown "$name"
    fi
    command -v systemd-nspawn >/dev/null || e2e_die "systemd-nspawn missing: run prepare first"
    local net=()
    case $E2E_NETWORK in
        private) net=(--private-network) ;;
        host) net=() ;;
        *) e2e_die "PMGUARD_E2E_NETWORK must be private or host, not $E2E_NETWORK" ;;
    esac
    local root lockfd
    root=$(e2e_root_path)
    [ -f "$root/.pmguard-e2e-stamp" ] || e2e_die "no cached root for this recipe at $root: run prepare first"
    mkdir -p "$E2E_RUN" "$E2E_TMP"
    DIR=$(mktemp -d "$E2E_TMP/pmguard-e2e-$name.XXXXXX")
    LOG=$DIR/console.log
    ROOT=$DIR/root
    MODE="" CGROUP="" NSPAWN_PID="" NSPAWN_START="" LEADER=""
    mkdir "$ROOT"
    # State first, so a boot killed at any point leaves something teardown/teardown-all finds.
    e2e_write_state "$name"
    exec {lockfd}>"$E2E_CACHE/lock"
    flock -s "$lockfd"   # no prepare may delete the root while we snapshot it
    MODE=copy
    if [ "$E2E_SNAPSHOT" = overlay ]; then
        mkdir "$DIR/upper" "$DIR/work"
        if mount -t overlay "pmguard-e2e-$name" \
            -o "lowerdir=$root,upperdir=$DIR/upper,workdir=$DIR/work" "$ROOT" 2>"$DIR/mount.err"; then
            MODE=overlay
        else
            e2e_log "overlay mount failed ($(cat "$DIR/mount.err")); copying the root instead"
        fi
    fi
    if [ "$MODE" = copy ]; then
        cp -a --reflink=auto "$root/." "$ROOT/"
    fi
    exec {lockfd}>&-
    CGROUP=pmguard-e2e/${DIR##*/}
    e2e_cgroup_create "$CGROUP"
    # setsid: the container must not get the caller's terminal signals (Ctrl-C of a test run is
    # handled by teardown instead).
    (
        e2e_cgroup_enter "$CGROUP"
        exec setsid systemd-nspawn --quiet --keep-unit --register=no --boot --directory="$ROOT" \
            --machine="$name" "${net[@]}" --console=read-only \
            --resolv-conf=off --timezone=off --link-journal=no
    ) </dev/null >"$LOG" 2>&1 &
    NSPAWN_PID=$!
    NSPAWN_START=$(e2e_proc_start "$NSPAWN_PID")
    local exec_deadline=$((SECONDS + 5))
    # The subshell execs setsid, which execs nspawn (no fork: a background job of a
    # non-interactive shell is never a process group leader).
    until [ "$(cat "/proc/$NSPAWN_PID/comm" 2>/dev/null)" = systemd-nspawn ]; do
        [ -d "/proc/$NSPAWN_PID" ] && [ "$SECONDS" -lt "$exec_deadline" ] || break
        sleep 0.05
    done
    e2e_write_state "$name"
    LEADER=""
    local deadline=$((SECONDS + E2E_BOOT_TIMEOUT)) state=""
    while :; do
        if ! e2e_nspawn_alive; then
            tail -n 40 "$LOG" >&2 || true
            e2e_write_state "$name"
            e2e_teardown "$name" || true
            e2e_die "systemd-nspawn exited while booting $name (console log above)"
        fi
        if [ -z "$LEADER" ]; then
            LEADER=$(e2e_find_leader "$NSPAWN_PID" || true)
            [ -z "$LEADER" ] || e2e_write_state "$name"
        fi
        if [ -n "$LEADER" ]; then
            state=$(nsenter -t "$LEADER" -a -- /usr/bin/env -i PATH="$E2E_PATH" \
                systemctl is-system-running 2>/dev/null || true)
            case $state in
                running | degraded) break ;;
            esac
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 40 "$LOG" >&2 || true
            e2e_write_state "$name"
            e2e_teardown "$name" || true
            e2e_die "machine $name did not boot within ${E2E_BOOT_TIMEOUT}s (last state '${state}')"
        fi
        sleep 0.2
    done
    e2e_write_state "$name"
    if [ "$state" = degraded ]; then
        e2e_log "machine $name is degraded; failed units:"
        e2e_nsenter systemctl --failed --no-legend >&2 || true
    fi
    e2e_log "machine $name booted ($state): dir $DIR, leader pid $LEADER, nspawn pid $NSPAWN_PID"
    echo "$DIR"
}

e2e_write_state() {
    local f tmp
    f=$(e2e_state_file "$1")
    tmp=$(mktemp "$f.XXXXXX")
    {
        printf 'DIR=%q\nROOT=%q\nMODE=%q\nLOG=%q\nCGROUP=%q\n' "$DIR" "$ROOT" "$MODE" "$LOG" "$CGROUP"
        printf 'NSPAWN_PID=%q\nNSPAWN_START=%q\nLEADER=%q\n' "$NSPAWN_PID" "$NSPAWN_START" "${LEADER:-}"
    } >"$tmp"
    mv -f "$tmp" "$f"
}

e2e_status() {
    e2e_check_name "${1:-}"
    e2e_load "$1" || { echo "machine $1: not booted"; return 1; }
    cat "$(e2e_state_file "$1")"
    if e2e_nspawn_alive; then echo "RUNNING=yes"; else echo "RUNNING=no"; return 1; fi
}

e2e_exec() {
    local name=${1:-}
    [ $# -ge 2 ] || e2e_die "usage: exec NAME CMD..."
    shift
    e2e_require_running "$name"
    e2e_nsenter HOME=/root USER=root LOGNAME=root "$@"
}

e2e_exec_as() {
    local name=${1:-} user=${2:-}
    [ $# -ge 3 ] || e2e_die "usage: exec-as NAME USER CMD..."
    shift 2
    e2e_require_running "$name"
    local ent uid gid home shell
    ent=$(e2e_nsenter getent passwd "$user") || e2e_die "machine $name has no user '$user'"
    IFS=: read -r _ _ uid gid _ home shell <<<"$ent"
    local env=(HOME="$home" USER="$user" LOGNAME="$user" SHELL="$shell")
    # XDG_RUNTIME_DIR only if a user manager made one (not needed by PM2).
    if e2e_nsenter test -d "/run/user/$uid"; then env+=(XDG_RUNTIME_DIR="/run/user/$uid"); fi
    # shellcheck disable=SC2016
    e2e_nsenter setpriv --reuid="$uid" --regid="$gid" --init-groups \
        /usr/bin/env "${env[@]}" /bin/sh -c 'cd "$HOME" 2>/dev/null || cd /; exec "$@"' sh "$@"
}

e2e_copy_in() {
    local name=${1:-} src=${2:-} dest=${3:-}
    [ $# -eq 3 ] || e2e_die "usage: copy-in NAME SRC DEST"
    e2e_require_running "$name"
    [ -e "$src" ] || e2e_die "copy-in: no such file: $src"
    [[ $dest == /* ]] || e2e_die "copy-in: DEST must be an absolute path inside the machine: $dest"
    local stage
    stage=$(mktemp -d)
    cp -a "$src" "$stage/payload"
    # Extracted next to DEST, then renamed over it: a running binary is replaced, not rewritten.
    # shellcheck disable=SC2016
    tar -C "$stage" --owner=0 --group=0 --numeric-owner -cf - payload \
        | e2e_nsenter /bin/sh -c '
            set -e
            dest=$1; parent=$(dirname "$dest"); mkdir -p "$parent"
            t=$(mktemp -d "$parent/.copy-in.XXXXXX"); trap "rm -rf \"$t\"" EXIT
            tar -C "$t" -xf -
            if [ -d "$t/payload" ]; then mkdir -p "$dest"; cp -a "$t/payload/." "$dest/"
            else mv -f "$t/payload" "$dest"; fi' sh "$dest" \
        || { rm -rf "$stage"; e2e_die "copy-in $src -> $name:$dest failed"; }
    rm -rf "$stage"
}

# Runs CMD; its output is shown only if it fails.
e2e_quiet() {
    local out
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        return 1
    fi
}

# Polls CMD (inside the machine) until it succeeds or SECS pass.
e2e_wait_inside() {
    local name=$1 secs=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until e2e_exec "$name" "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

e2e_setup_app() {
    local name=${1:-}
    e2e_require_running "$name"
    local app=$E2E_REPO/agent/tests/apps/app.js url="http://127.0.0.1:$E2E_APP_PORT/health"
    [ -f "$app" ] || e2e_die "sample app not found: $app"
    local home=/home/$E2E_USER
    if e2e_exec "$name" systemctl is-active --quiet "pm2-$E2E_USER" \
        && e2e_exec "$name" curl -fsS -m 5 "$url" >/dev/null 2>&1; then
        e2e_log "app already set up in $name"
        return 0
    fi
    # Start from a clean PM2: stop the unit and any daemon, then let the unit own the daemon.
    # (Any pm2 command starts a daemon if none runs: only kill one that exists.)
    e2e_exec "$name" systemctl stop "pm2-$E2E_USER" >/dev/null 2>&1 || true
    # shellcheck disable=SC2016
    e2e_quiet e2e_exec_as "$name" "$E2E_USER" sh -c '[ ! -e "$HOME/.pm2/pm2.pid" ] || pm2 kill' \
        || e2e_die "pm2 kill failed"
    e2e_copy_in "$name" "$app" "$home/app/app.js"
    e2e_exec "$name" chown -R "$E2E_USER:$E2E_USER" "$home/app"
    e2e_quiet e2e_exec_as "$name" "$E2E_USER" env PORT="$E2E_APP_PORT" \
        pm2 start "$home/app/app.js" --name codebox || e2e_die "pm2 start failed"
    e2e_quiet e2e_exec_as "$name" "$E2E_USER" pm2 save --force || e2e_die "pm2 save failed"
    # The daemon started above lives in nsenter's cgroup, outside systemd: stop it so that
    # pm2-ubuntu.service starts the daemon itself (`pm2 resurrect` of the saved list).
    e2e_quiet e2e_exec_as "$name" "$E2E_USER" pm2 kill || e2e_die "pm2 kill failed"
    e2e_quiet e2e_exec "$name" pm2 startup systemd -u "$E2E_USER" --hp "$home" \
        || e2e_die "pm2 startup failed"
    e2e_exec "$name" systemctl daemon-reload
    e2e_quiet e2e_exec "$name" systemctl enable --now "pm2-$E2E_USER" \
        || { e2e_exec "$name" journalctl -u "pm2-$E2E_USER" --no-pager >&2 || true
             e2e_die "pm2-$E2E_USER failed to start"; }
    e2e_wait_inside "$name" 30 curl -fsS -m 2 "$url" \
        || e2e_die "app did not answer $url inside $name within 30s"
    local body active
    body=$(e2e_exec "$name" curl -fsS -m 5 "$url")
    [ "$body" = ok ] || e2e_die "unexpected health answer '$body' from $url"
    active=$(e2e_exec "$name" systemctl is-active "pm2-$E2E_USER" || true)
    [ "$active" = active ] || e2e_die "pm2-$E2E_USER is '$active', not active"
    e2e_exec "$name" systemctl is-enabled --quiet "pm2-$E2E_USER" || e2e_die "pm2-$E2E_USER not enabled"
    e2e_log "app codebox online under pm2-$E2E_USER.service, $url answers '$body'"
}

e2e_teardown() {
    local name=${1:-}
    e2e_check_name "$name"
    if ! e2e_load "$name"; then
        e2e_log "machine $name: nothing to tear down"
        return 0
    fi
    if e2e_nspawn_alive; then
        # An orderly poweroff first (the units' ExecStop run), then SIGKILL: killing the
        # container's PID 1 kills every process in its pid namespace, nsenter'd ones included.
        if [ -n "${LEADER:-}" ] && [ -d "/proc/$LEADER" ]; then
            kill -s RTMIN+4 "$LEADER" 2>/dev/null || true
        else
            kill -TERM "$NSPAWN_PID" 2>/dev/null || true
        fi
        local deadline=$((SECONDS + 30))
        while e2e_nspawn_alive && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        if e2e_nspawn_alive; then
            e2e_log "machine $name did not power off in 30s; killing it"
            [ -n "${LEADER:-}" ] && kill -KILL "$LEADER" 2>/dev/null || true
            kill -KILL "$NSPAWN_PID" 2>/dev/null || true
            deadline=$((SECONDS + 10))
            while e2e_nspawn_alive && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
            e2e_nspawn_alive && e2e_die "machine $name (nspawn pid $NSPAWN_PID) would not die"
        fi
    fi
    if [ -n "${DIR:-}" ] && [ -d "$DIR" ]; then
        case $DIR in
            "$E2E_TMP"/pmguard-e2e-"$name".*) ;;
            *) e2e_die "refusing to remove unexpected machine dir '$DIR'" ;;
        esac
        e2e_umount_tree "$DIR"
        # Never recurse into a still-mounted tree (it would be the cached root).
        if grep -qF " $ROOT " /proc/self/mountinfo; then e2e_die "$ROOT is still mounted"; fi
        rm -rf --one-file-system "$DIR"
    fi
    e2e_cgroup_remove "${CGROUP:-}"
    rm -f "$(e2e_state_file "$name")"
    e2e_log "machine $name torn down"
}

# ---------------------------------------------------------------------------------------------
# selftest
# ---------------------------------------------------------------------------------------------

e2e_selftest() {
    local name="selftest-$$" t0 total0=$SECONDS
    local -a times=()
    phase() { times+=("$(printf '%-10s %5ss' "$1" "$2")"); e2e_log "phase $1: ${2}s"; }
    trap 'e2e_teardown "'"$name"'" >/dev/null 2>&1 || true' EXIT
    trap 'exit 130' INT TERM
    t0=$SECONDS; e2e_prepare; phase prepare $((SECONDS - t0))
    t0=$SECONDS; e2e_boot "$name" >/dev/null; phase boot $((SECONDS - t0))
    t0=$SECONDS; e2e_setup_app "$name"; phase setup-app $((SECONDS - t0))
    t0=$SECONDS
    e2e_exec "$name" systemctl status "pm2-$E2E_USER" --no-pager
    local body
    body=$(e2e_exec "$name" curl -fsS -m 5 "http://127.0.0.1:$E2E_APP_PORT/health")
    [ "$body" = ok ] || e2e_die "health answered '$body'"
    e2e_exec_as "$name" "$E2E_USER" pm2 jlist | grep -q '"name":"codebox"' \
        || e2e_die "pm2 jlist as $E2E_USER does not list codebox"
    # What the installer test relies on: offline security analysis, daemon-reload, show.
    e2e_exec "$name" systemd-analyze security --offline=true "pm2-$E2E_USER.service" \
        | grep -q 'Overall exposure level' || e2e_die "systemd-analyze security gave no verdict"
    e2e_exec "$name" systemctl daemon-reload
    e2e_exec "$name" systemctl show -p ActiveState,NRestarts,WatchdogUSec "pm2-$E2E_USER" \
        | grep -qx 'ActiveState=active' || e2e_die "systemctl show: pm2-$E2E_USER not active"
    phase verify $((SECONDS - t0))
    t0=$SECONDS; e2e_teardown "$name"; phase teardown $((SECONDS - t0))
    trap - EXIT INT TERM
    [ ! -e "$(e2e_state_file "$name")" ] || e2e_die "state file left behind"
    if pgrep -f -- "--machine=$name( |$)" >/dev/null; then e2e_die "processes left behind"; fi
    printf '\nselftest passed in %ss\n' $((SECONDS - total0))
    printf '  %s\n' "${times[@]}"
}

# Tears down every machine with a state file (cleanup after a crashed test run).
e2e_teardown_all() {
    local f rc=0
    for f in "$E2E_RUN"/*.state; do
        [ -e "$f" ] || continue
        f=${f##*/}
        ( e2e_teardown "${f%.state}" ) || rc=1
    done
    return $rc
}

e2e_main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case $cmd in
        prepare) e2e_prepare ;;
        boot) e2e_need_root; e2e_boot "$@" ;;
        exec) e2e_need_root; e2e_exec "$@" ;;
        exec-as) e2e_need_root; e2e_exec_as "$@" ;;
        copy-in) e2e_need_root; e2e_copy_in "$@" ;;
        setup-app) e2e_need_root; e2e_setup_app "$@" ;;
        status) e2e_status "$@" ;;
        teardown) e2e_need_root; e2e_teardown "$@" ;;
        teardown-all) e2e_need_root; e2e_teardown_all ;;
        selftest) e2e_need_root; e2e_selftest ;;
        -h | --help | help | "") sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' ;;
        *) e2e_die "unknown command '$cmd' (try --help)" ;;
    esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    e2e_main "$@"
fi
