#!/usr/bin/env bash
# Idempotent host set-up for kvm-completion-tracer on Debian 12 (used by `make run`/`make test`
# and CI).  Safe to run again: a second run on a set-up host does no apt work and no pip work.
#
#   1. Debian packages (apt only when one is missing, checked with dpkg-query)
#   2. kernel headers for bcc: /lib/modules/$(uname -r)/{build,source}, falling back (with a
#      warning) to Debian's generic linux-headers-amd64 when no linux-headers-$(uname -r) exists
#   3. tracefs and debugfs mounted
#   4. .venv from Debian's /usr/bin/python3 with --system-site-packages (bcc is only there)
#   5. pip install -e '.[dev]' into .venv (skipped while a stamp is newer than pyproject.toml)
#
# Usage: setup-host.sh [run|test]  (default test). `run` sets up only what the daemon needs on a
# hypervisor host; `test` adds the compiler, QEMU, Prometheus, bpftrace and the dev tools.
# Environment: SETUP_HOST_SKIP_APT=1 skips step 1 (for hosts managed otherwise).
set -euo pipefail

mode="${1:-test}"
case "$mode" in
    run|test|bench) ;;
    *) echo "setup-host: error: unknown mode '$mode' (expected run, test or bench)" >&2; exit 2 ;;
esac

me="setup-host"
die() { echo "$me: error: $*" >&2; exit 1; }
warn() { echo "$me: warning: $*" >&2; }
info() { echo "$me: $*"; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (bcc, tracefs and apt need it): try 'sudo make ...'"
[[ -r /etc/debian_version ]] || warn "not a Debian host; package names assume Debian 12"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

kver="$(uname -r)"
kpkg="linux-headers-$kver"
system_python=/usr/bin/python3
venv="$repo/.venv"
stamp="$venv/.kvm-completion-tracer-installed-$mode"

# llvm: llvm-symbolizer names the stacks' frames; debuginfod: its client fetches debug info
# when DEBUGINFOD_URLS is set (docs/stacks.md).
base_packages=(python3-bpfcc python3-venv llvm debuginfod)
if [[ "$mode" == test ]]; then
    base_packages+=(
        gcc libc6-dev linux-libc-dev make util-linux systemd gdb binutils iproute2
        qemu-system-x86 prometheus prometheus-alertmanager bpftrace python3-seccomp
        buildah mmdebstrap
    )
    # The watch tests build a std-only Rust VMM: a rustup toolchain will do, else Debian's.
    if ! command -v rustc >/dev/null 2>&1 && [[ ! -x "${HOME:-/root}/.cargo/bin/rustc" ]]; then
        base_packages+=(rustc)
    fi
    pip_target="$repo[dev]"
    pip_shown="'.[dev]'"
elif [[ "$mode" == bench ]]; then
    # make bench: the C drivers and the bpftrace one-off, nothing of the test stack.
    base_packages+=(gcc libc6-dev linux-libc-dev make bpftrace)
    pip_target="$repo"
    pip_shown="."
else
    pip_target="$repo"
    pip_shown="."
fi

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == "installed" ]]
}

apt_updated=0
apt_update() {
    if [[ $apt_updated -eq 0 ]]; then
        info "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || die "apt-get update failed"
        apt_updated=1
    fi
}

# --- 1. packages ---------------------------------------------------------------------------------
if [[ "${SETUP_HOST_SKIP_APT:-0}" != "1" ]]; then
    missing=()
    for p in "${base_packages[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
    # Headers: the running kernel's own package when it is installed or can be had, else
    # Debian's generic metapackage (only looked up in apt when neither is installed).
    if ! is_installed "$kpkg" && ! is_installed linux-headers-amd64; then
        apt_update
        if apt-cache show "$kpkg" >/dev/null 2>&1; then
            missing+=("$kpkg")
        else
            missing+=(linux-headers-amd64)
        fi
    fi
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt_update
        info "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    fi
fi

# --- 2. kernel headers for bcc -------------------------------------------------------------------
moddir="/lib/modules/$kver"
if [[ -e "$moddir/build/Makefile" && -e "$moddir/source" ]]; then
    build_target="$(readlink -f "$moddir/build")"
else
    if [[ -d "/usr/src/$kpkg" ]]; then
        build_dir="/usr/src/$kpkg"
        source_dir="$build_dir"
        # Debian's -amd64 header trees point into a -common sibling.
        common="/usr/src/${kpkg%-amd64}-common"
        [[ -d "$common" ]] && source_dir="$common"
    else
        # The generic package linux-headers-amd64 depends on linux-headers-<abi>-amd64.
        generic="$(dpkg-query -W -f='${Depends}' linux-headers-amd64 2>/dev/null \
            | grep -o 'linux-headers-[^ ,]*-amd64' | head -n1 || true)"
        if [[ -z "$generic" || ! -d "/usr/src/$generic" ]]; then
            generic="$(find /usr/src -maxdepth 1 -name 'linux-headers-*-amd64' -printf '%f\n' \
                | sort -V | tail -n1)"
        fi
        [[ -n "$generic" && -d "/usr/src/$generic" ]] \
            || die "no kernel headers under /usr/src (install linux-headers-amd64)"
        build_dir="/usr/src/$generic"
        source_dir="/usr/src/${generic%-amd64}-common"
        [[ -d "$source_dir" ]] || source_dir="$build_dir"
    fi
    mkdir -p "$moddir"
    ln -sfn "$build_dir" "$moddir/build"
    ln -sfn "$source_dir" "$moddir/source"
    info "linked $moddir/build -> $build_dir, $moddir/source -> $source_dir"
    build_target="$(readlink -f "$moddir/build")"
fi
if [[ "$build_target" != "/usr/src/$kpkg" ]]; then
    warn "no $kpkg package; bcc uses Debian's generic headers ${build_target##*/} for kernel $kver"
fi

# --- 3. tracefs / debugfs ------------------------------------------------------------------------
is_mounted() { awk -v d="$1" -v t="$2" '$2 == d && $3 == t { f = 1 } END { exit !f }' /proc/mounts; }
if ! is_mounted /sys/kernel/debug debugfs; then
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null \
        || warn "could not mount debugfs on /sys/kernel/debug"
fi
if ! is_mounted /sys/kernel/tracing tracefs; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null \
        || warn "could not mount tracefs on /sys/kernel/tracing (the probes need it)"
fi

# --- 4. venv -------------------------------------------------------------------------------------
[[ -x "$system_python" ]] || die "$system_python missing (apt-get install python3)"
"$system_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$system_python is older than 3.11"
venv_ok() {
    [[ -x "$venv/bin/python" && -r "$venv/pyvenv.cfg" ]] || return 1
    grep -qx 'include-system-site-packages = true' "$venv/pyvenv.cfg" || return 1
    # Must be Debian's interpreter (the pyenv one first on PATH cannot import bcc).
    local home
    home="$(sed -n 's/^home = //p' "$venv/pyvenv.cfg")"
    [[ "$(readlink -f "$home/python3")" == "$(readlink -f "$system_python")" ]] || return 1
    "$venv/bin/python" -c '' 2>/dev/null
}
if ! venv_ok; then
    if [[ -e "$venv" ]]; then
        warn "$venv is not a --system-site-packages venv of $system_python: recreating it"
        rm -rf "$venv"
    fi
    info "creating $venv"
    "$system_python" -m venv --system-site-packages "$venv" || die "could not create $venv"
fi

# --- 5. the project (editable) with dev tools ----------------------------------------------------
if [[ ! -e "$stamp" || "$repo/pyproject.toml" -nt "$stamp" ]] \
    || ! "$venv/bin/python" -c 'import importlib.metadata as m; m.version("kvm-completion-tracer")' \
        >/dev/null 2>&1; then
    info "pip install -e $pip_shown"
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$venv/bin/python" -m pip install -q -e "$pip_target" \
        || die "pip install -e $pip_shown failed"
    touch "$stamp"
fi

if ! "$venv/bin/python" -c 'import bcc' >/dev/null 2>&1; then
    warn "'import bcc' fails in $venv (is python3-bpfcc installed?)"
fi
info "ok"
