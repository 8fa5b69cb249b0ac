#!/usr/bin/env bash
# `make distro-check`: the README's set-up and the daemon's commands on a fresh Debian 13
# (trixie) root, as a new user would run them on a fresh host.
#
#   1. a minbase trixie root made with mmdebstrap (+ ca-certificates, git, make), cached as a
#      tarball in $KCT_DISTRO_CACHE (default /var/cache/kvm-completion-tracer/distro-check;
#      rebuilt after 7 days), unpacked into a temporary directory;
#   2. this checkout cloned into it (`git clone`: the committed HEAD, as CI sees it) at
#      /root/kvm-completion-tracer (mode 0700, as a checkout in root's home is);
#   3. in a private mount namespace (unshare -m): the root bound onto itself, /dev, /proc, /sys
#      (with tracefs and debugfs) bound in, the host's resolv.conf, extra CA certificates and
#      pip configuration copied in (they reach the same registries as the host);
#   4. inside (chroot), one line per step, ok/FAIL and seconds:
#        setup-run   make setup-run (scripts/setup-host.sh run), then no kernel image,
#                    initramfs-tools, systemd-sysv or udev installed and nothing in /boot
#        check       make check
#        selftest    make selftest
#        run         the daemon started, the project's buggy VMM (python -m tracer.vmm
#                    buggy-io-out) run, its completion_violation alert seen, the daemon stopped
#                    (SIGTERM, exit 0)
#        watch       kvm-completion-tracer watch -- the buggy VMM: exit 66
#      With --full, then `make test` (the whole suite, test-mode set-up; about 15 minutes here).
#
# Exit 0 when every step passed, 1 otherwise.  Downloaded .deb files are kept in the cache
# directory too (bound as the root's /var/cache/apt/archives), so a second run downloads nothing;
# the set-up itself still runs from scratch in the fresh root each time.
#
# Usage: scripts/distro-check.sh [--full] [--keep] [--suite trixie]
#   --keep   leave the unpacked root in place (its path is printed) for a look afterwards
set -euo pipefail

me="distro-check"
die() { echo "$me: error: $*" >&2; exit 2; }
info() { echo "$me: $*"; }

full=0
keep=0
suite=trixie
while [[ $# -gt 0 ]]; do
    case "$1" in
        --full) full=1 ;;
        --keep) keep=1 ;;
        --suite) [[ $# -ge 2 ]] || die "--suite needs a value"; suite="$2"; shift ;;
        _inside) break ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

# ---- inside the root ----------------------------------------------------------------------------
if [[ "${1:-}" == "_inside" ]]; then
    full="${2:-0}"
    cd "$3"
    since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
    export DEBIAN_FRONTEND=noninteractive
    failed=0
    logdir=/var/log/distro-check
    mkdir -p "$logdir"
    step() {  # step NAME COMMAND...: one line, ok/FAIL and seconds; the output in $logdir/NAME.log
        local name="$1" t0 rc=0
        shift
        t0=$(date +%s.%N)
        "$@" >"$logdir/$name.log" 2>&1 || rc=$?
        if [[ $rc -eq 0 ]]; then
            printf '%s: ok   %-10s %6s s\n' "$me" "$name" "$(since "$t0")"
        else
            printf '%s: FAIL %-10s %6s s (exit %d; last lines of %s:)\n' "$me" "$name" \
                "$(since "$t0")" "$rc" "$logdir/$name.log"
            tail -n 25 "$logdir/$name.log" | sed 's/^/    /'
            failed=1
        fi
        return 0
    }
    no_kernel() {
        # Nothing that boots: no kernel image, no initramfs generator, no init system, no udev.
        local bad
        bad="$(dpkg-query -W -f='${db:Status-Status} ${Package}\n' 2>/dev/null \
            | awk '$1 == "installed" && $2 ~ /^(linux-image-.*|initramfs-tools.*|dracut.*|systemd-sysv|udev)$/ { print $2 }')"
        if [[ -n "$bad" ]]; then
            echo "installed, but must not be:" $bad
            return 1
        fi
        if compgen -G '/boot/vmlinu*' >/dev/null || compgen -G '/boot/initrd*' >/dev/null; then
            echo "a kernel or initrd in /boot:" /boot/*
            return 1
        fi
        echo "no kernel image, initramfs-tools, systemd-sysv or udev; /boot: $(ls -A /boot 2>/dev/null | wc -l) entries"
    }
    setup_run() {
        make setup-run
        no_kernel
    }
    daemon_run() {
        # The daemon as `make run` starts it (JSON logs to a file), the project's buggy VMM, the
        # alert, SIGTERM.
        local out port pid vmm_rc=0 i rc=0
        out="$(mktemp)"
        port="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
        .venv/bin/kvm-completion-tracer run --log-format json --snapshot-idle 0.2 \
            --state-dir "$(mktemp -d)" --metrics-addr "127.0.0.1:$port" >"$out" 2>&1 &
        pid=$!
        for i in $(seq 1 900); do
            grep -q '"event": "ready"' "$out" && break
            kill -0 "$pid" 2>/dev/null || { cat "$out"; echo "daemon exited before ready"; return 1; }
            sleep 0.1
        done
        grep -q '"event": "ready"' "$out" || { cat "$out"; kill "$pid"; echo "daemon not ready in 90 s"; return 1; }
        .venv/bin/python -m tracer.vmm buggy-io-out --iterations 2 --no-logs --report /dev/null \
            || vmm_rc=$?
        for i in $(seq 1 100); do
            grep -q '"event": "completion_violation"' "$out" && break
            sleep 0.1
        done
        kill -TERM "$pid"
        wait "$pid" || rc=$?
        cat "$out"
        [[ $vmm_rc -eq 0 ]] || { echo "the VMM failed (exit $vmm_rc)"; return 1; }
        grep -q '"event": "completion_violation"' "$out" || { echo "no completion_violation alert"; return 1; }
        [[ $rc -eq 0 ]] || { echo "daemon exited $rc on SIGTERM"; return 1; }
        echo "alert seen; daemon stopped with exit 0"
    }
    gate_watch() {
        local rc=0
        .venv/bin/kvm-completion-tracer watch -- .venv/bin/python -m tracer.vmm buggy-io-out \
            --iterations 2 --no-logs --report /dev/null || rc=$?
        [[ $rc -eq 66 ]] || { echo "watch exited $rc, expected 66 (findings)"; return 1; }
        echo "watch exited 66 (findings)"
    }
    step setup-run setup_run
    step check make check
    step selftest make selftest
    step run daemon_run
    step watch gate_watch
    if [[ "$full" == 1 ]]; then
        step test make test
        step no-kernel no_kernel
    fi
    exit "$failed"
fi

# ---- outside: build, unpack, bind, chroot -------------------------------------------------------
[[ "$(id -u)" -eq 0 ]] || die "must run as root (mmdebstrap, mounts, chroot): try 'sudo make distro-check'"
for tool in mmdebstrap unshare chroot git; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (scripts/setup-host.sh test installs mmdebstrap)"
done
[[ -e /dev/kvm ]] || die "/dev/kvm missing: the steps run real KVM guests"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
git -C "$repo" rev-parse HEAD >/dev/null 2>&1 || die "$repo is not a git checkout"

cache_dir="${KCT_DISTRO_CACHE:-/var/cache/kvm-completion-tracer/distro-check}"
base_tar="$cache_dir/$suite-base.tar"
debs="$cache_dir/$suite-debs"
mkdir -p "$cache_dir" "$debs/partial"
start=$(date +%s.%N)
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

t0=$(date +%s.%N)
if [[ -s "$base_tar" && -z "$(find "$base_tar" -mtime +7)" ]]; then
    printf '%s: ok   %-10s %6s s (cached %s)\n' "$me" root "$(since "$t0")" "$base_tar"
else
    tmp="$cache_dir/.partial-$$.tar"
    mmdebstrap --variant=minbase --format=tar --quiet --include=ca-certificates,git,make \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb' \
        "$suite" "$tmp" "${KCT_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
        || { rm -f "$tmp"; die "mmdebstrap $suite failed"; }
    mv "$tmp" "$base_tar"
    printf '%s: ok   %-10s %6s s (built %s)\n' "$me" root "$(since "$t0")" "$base_tar"
fi

root="$(mktemp -d /var/tmp/kct-distro-check.XXXXXX)"
cleanup() {
    if [[ $keep -eq 1 ]]; then
        info "root kept at $root (logs in $root/var/log/distro-check)"
    else
        rm -rf --one-file-system "$root"
    fi
}
trap cleanup EXIT
tar -xf "$base_tar" -C "$root"
git clone -q "$repo" "$root/root/kvm-completion-tracer"
chmod 0700 "$root/root"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The host's extra CA certificates and pip configuration: the root reaches the registries the
# way the host does.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1 || true
fi
[[ -r /etc/pip.conf ]] && cp /etc/pip.conf "$root/etc/pip.conf"
# This script runs the steps inside (the clone has only what is committed; this file may not be).
install -m 0755 "${BASH_SOURCE[0]}" "$root/usr/local/bin/kct-distro-check"

rc=0
# A private mount namespace: everything bound here goes away with it.  The root is bound onto
# itself so that it is a mount point; /sys comes with the host's tracefs and debugfs mounts.
# shellcheck disable=SC2016
unshare -m --propagation private bash -euo pipefail -c '
    root="$1"; debs="$2"; full="$3"
    mount --bind "$root" "$root"
    for d in dev proc sys; do mkdir -p "$root/$d"; mount --rbind "/$d" "$root/$d"; done
    mount --bind "$debs" "$root/var/cache/apt/archives"
    mount -t tmpfs tmpfs "$root/tmp"
    exec chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin CI="${CI:-}" \
        bash /usr/local/bin/kct-distro-check _inside "$full" /root/kvm-completion-tracer
' distro-check "$root" "$debs" "$full" || rc=$?

if [[ $rc -eq 0 ]]; then
    printf '%s: ok   %-10s %6s s (Debian %s root, %s)\n' "$me" total "$(since "$start")" \
        "$suite" "$(git -C "$repo" rev-parse --short HEAD)"
else
    printf '%s: FAIL %-10s %6s s\n' "$me" total "$(since "$start")"
    keep=1
fi
exit "$rc"
