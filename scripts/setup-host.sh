#!/usr/bin/env bash
# Idempotent host set-up for kvm-completion-tracer on Debian 12 (bookworm) and Debian 13 (trixie)
# (used by `make run`/`make test` and CI).  Safe to run again: a second run on a set-up host does
# no apt work and no pip work.
#
#   1. Debian packages (apt only when one is missing, checked with dpkg-query), with
#      --no-install-recommends; before installing, apt's plan is checked: nothing that boots
#      (a linux-image, initramfs-tools, dracut, systemd-sysv, udev; in `run` mode no systemd
#      either) may come with it, else the script stops without installing anything.  It prints
#      every package it installed.
#   2. kernel headers for bcc: /lib/modules/$(uname -r)/{build,source}.  The running kernel's
#      linux-headers-$(uname -r) when Debian has it, else Debian's generic headers (with a
#      warning).  Debian 12's generic headers install without a kernel; Debian 13's
#      linux-headers-<abi>-amd64 depends on its linux-image: then only its -common part is
#      installed with apt, and the -amd64 package (generated headers, .config, ~10 MB) is
#      fetched with `apt-get download` (hash-checked by apt) and unpacked, not installed, under
#      /usr/src/kvm-completion-tracer/ (under /usr/src, which the container's grant mounts): a
#      monitoring tool never puts a kernel into /boot.
#   3. tracefs and debugfs mounted
#   4. .venv from Debian's /usr/bin/python3 with --system-site-packages (bcc is only there)
#   5. pip install -e '.[dev]' into .venv (skipped while a stamp is newer than pyproject.toml)
#
# Usage: setup-host.sh [run|test|bench]  (default test). `run` sets up only what the daemon needs
# on a hypervisor host; `test` adds the compilers, QEMU, Prometheus, bpftrace, buildah and the dev
# tools; `bench` the C compiler and bpftrace.
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
[[ -r /etc/debian_version ]] || warn "not a Debian host; package names assume Debian 12 or 13"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

kver="$(uname -r)"
kpkg="linux-headers-$kver"
system_python=/usr/bin/python3
venv="$repo/.venv"
stamp="$venv/.kvm-completion-tracer-installed-$mode"

# llvm: llvm-symbolizer names the stacks' frames; libdebuginfod1: elfutils' debuginfod client
# library fetches debug info when DEBUGINFOD_URLS is set (docs/stacks.md); no server.
base_packages=(python3-bpfcc python3-venv llvm libdebuginfod1)
if [[ "$mode" == test ]]; then
    base_packages+=(
        gcc g++ libc6-dev linux-libc-dev make util-linux procps systemd git gdb binutils iproute2
        debuginfod
        qemu-system-x86 prometheus prometheus-alertmanager bpftrace python3-seccomp
        buildah mmdebstrap
    )
    # g++: the C++ demangling fixtures; procps: /bin/kill, which `systemd-analyze verify` wants
    # for the unit's ExecReload; git: make distro-check clones the checkout.
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
installed_list() {
    dpkg-query -W -f='${db:Status-Status} ${Package}\n' 2>/dev/null | awk '$1 == "installed" { print $2 }' | sort
}

apt_updated=0
apt_update() {
    if [[ $apt_updated -eq 0 ]]; then
        info "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || die "apt-get update failed"
        apt_updated=1
    fi
}

# What must never come with the tool's packages: anything that boots (a kernel in /boot, an
# initramfs generator, an init system, udev); in `run` mode (a production hypervisor) no systemd
# package either (`test` asks for it: systemd-analyze checks the unit).
forbidden='^(linux-image-.*|initramfs-tools.*|dracut.*|systemd-sysv|udev)$'
[[ "$mode" == run ]] && forbidden='^(linux-image-.*|initramfs-tools.*|dracut.*|systemd-sysv|udev|systemd)$'
# apt_plan PKG...: the packages `apt-get install` would install (a dry run; nothing changes).
apt_plan() {
    DEBIAN_FRONTEND=noninteractive apt-get install -s -qq --no-install-recommends "$@" 2>/dev/null \
        | awk '$1 == "Inst" { print $2 }'
}

# Debian 13's linux-headers-<abi>-amd64 depends on linux-image-<abi>-amd64: its generated
# headers are unpacked here instead (see the header comment), next to a stamp naming the .deb.
local_headers=/usr/src/kvm-completion-tracer
unpack_headers=""

# --- 1. packages ---------------------------------------------------------------------------------
if [[ "${SETUP_HOST_SKIP_APT:-0}" != "1" ]]; then
    missing=()
    for p in "${base_packages[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
    # buildah >= 1.35 (containers-common >= 0.58) has no CNI backend left: it needs netavark,
    # which containers-common only recommends.  Older ones run on CNI (the first provider of
    # container-network-stack), as Debian 12's does.
    if [[ " ${missing[*]} " == *" buildah "* ]] || is_installed buildah; then
        if ! is_installed netavark; then
            if is_installed golang-github-containers-common; then
                common_ver="$(dpkg-query -W -f='${Version}' golang-github-containers-common)"
            else
                apt_update
                common_ver="$(apt-cache policy golang-github-containers-common 2>/dev/null \
                    | awk '$1 == "Candidate:" { print $2 }')"
            fi
            if [[ -n "$common_ver" && "$common_ver" != "(none)" ]] \
                && dpkg --compare-versions "$common_ver" ge 0.58; then
                missing+=(netavark)
            fi
        fi
    fi
    # Headers: the running kernel's own package when it is installed or can be had, else
    # Debian's generic headers (only looked up in apt when none is installed).
    if ! is_installed "$kpkg" && ! is_installed linux-headers-amd64 \
        && ! compgen -G "$local_headers/linux-headers-*/.unpacked-from" >/dev/null; then
        apt_update
        if apt-cache show "$kpkg" >/dev/null 2>&1; then
            missing+=("$kpkg")
        else
            # linux-headers-amd64 -> linux-headers-<abi>-amd64 (the versioned one).
            vpkg="$(apt-cache depends linux-headers-amd64 2>/dev/null \
                | awk '$1 == "Depends:" && $2 ~ /^linux-headers-.*-amd64$/ { print $2; exit }')"
            [[ -n "$vpkg" ]] || die "apt knows no linux-headers-amd64 (is deb.debian.org main in the apt sources?)"
            if apt_plan "$vpkg" | grep -Eq "$forbidden"; then
                # Its -common part (arch-independent headers) has no kernel dependency.
                common_pkg="$(apt-cache depends "$vpkg" 2>/dev/null \
                    | awk '$1 == "Depends:" && $2 ~ /^linux-headers-.*-common$/ { print $2; exit }')"
                [[ -n "$common_pkg" ]] || die "$vpkg depends on a kernel image and names no -common headers package"
                is_installed "$common_pkg" || missing+=("$common_pkg")
                unpack_headers="$vpkg"
            else
                missing+=("$vpkg")
            fi
        fi
    fi
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt_update
        bad="$(apt_plan "${missing[@]}" | grep -E "$forbidden" || true)"
        if [[ -n "$bad" ]]; then
            die "installing ${missing[*]} would also install $(echo $bad) ($mode mode never installs a kernel, initramfs, init system or udev); install the packages yourself or set SETUP_HOST_SKIP_APT=1"
        fi
        before="$(installed_list)"
        info "apt-get install --no-install-recommends ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
        added="$(comm -13 <(echo "$before") <(installed_list) | tr '\n' ' ')"
        info "installed $(wc -w <<<"$added") packages: $added"
    fi
    if [[ -n "$unpack_headers" ]]; then
        apt_update
        tmp="$(mktemp -d)"
        ( cd "$tmp" && apt-get download -qq "$unpack_headers" >/dev/null 2>&1 ) \
            || { rm -rf "$tmp"; die "apt-get download $unpack_headers failed"; }
        deb="$(ls "$tmp"/*.deb)"
        version="$(dpkg-deb -f "$deb" Version)"
        dpkg-deb -x "$deb" "$tmp/x" || { rm -rf "$tmp"; die "cannot unpack $deb"; }
        [[ -r "$tmp/x/usr/src/$unpack_headers/include/generated/autoconf.h" ]] \
            || { rm -rf "$tmp"; die "$deb has no usr/src/$unpack_headers/include/generated/autoconf.h"; }
        mkdir -p "$local_headers"
        rm -rf "${local_headers:?}/$unpack_headers"
        mv "$tmp/x/usr/src/$unpack_headers" "$local_headers/$unpack_headers"
        printf '%s %s %s\n' "$unpack_headers" "$version" "$(sha256sum "$deb" | cut -d' ' -f1)" \
            >"$local_headers/$unpack_headers/.unpacked-from"
        rm -rf "$tmp"
        info "unpacked $unpack_headers $version into $local_headers/$unpack_headers (not installed: the package depends on a kernel image; remove with rm -rf $local_headers)"
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
        # The generic package linux-headers-amd64 depends on linux-headers-<abi>-amd64
        # (installed, Debian 12), or that package unpacked by step 1 (Debian 13).
        generic="$(dpkg-query -W -f='${Depends}' linux-headers-amd64 2>/dev/null \
            | grep -o 'linux-headers-[^ ,]*-amd64' | head -n1 || true)"
        build_dir="/usr/src/$generic"
        if [[ -z "$generic" || ! -d "$build_dir" ]]; then
            build_dir="$(find /usr/src "$local_headers" -maxdepth 1 -name 'linux-headers-*-amd64' \
                -printf '%f %p\n' 2>/dev/null | sort -V | tail -n1 | cut -d' ' -f2)"
            generic="${build_dir##*/}"
        fi
        [[ -n "$generic" && -d "$build_dir" ]] \
            || die "no kernel headers under /usr/src or $local_headers (run without SETUP_HOST_SKIP_APT, or install linux-headers-$kver)"
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
