#!/usr/bin/env bash
# Build the container image from the repository's Dockerfile (`make image`).
#
# Engine: the first of docker, podman, buildah that actually works here (`docker info` reaches a
# daemon; `podman info` / `buildah info` answer), or KCT_IMAGE_ENGINE=docker|podman|buildah.
# podman and buildah build with --isolation chroot (BUILDAH_ISOLATION overrides it): the OCI
# runtime is not usable on every host (crun's setrlimit is refused in some VMs), and a chroot is
# all a build needs.  They build the docker format: the OCI format has no HEALTHCHECK.
#
# Base image (debian:bookworm-slim): used when the engine has it; else pulled; when no registry
# is reachable, made locally: `mmdebstrap --variant=minbase bookworm` with the same dpkg
# path-excludes as Debian's official slim image, cached as a tarball in $KCT_IMAGE_CACHE
# (default /var/cache/kvm-completion-tracer, never the repository; rebuilt after 30 days), and
# imported under the official name.
#
# Host configuration: podman/buildah builds get the host's CA bundle (at /mnt/host-ca), pip
# configuration (/etc/pip.conf, its `cert` pointed there) and apt proxy settings (from
# `apt-config dump`) as read-only build volumes: mounted while a RUN step runs, in no layer
# (only their empty mount points are).  `docker build`
# has no build volumes: a Docker host must reach PyPI and deb.debian.org by itself.
#
# Usage: scripts/build-image.sh [--which-engine] [TAG...]
#   default tags: kvm-completion-tracer:latest and kvm-completion-tracer:<package version>
#   --which-engine  print the engine that would build, and exit (1: none works)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base_image="docker.io/library/debian:bookworm-slim"
cache_dir="${KCT_IMAGE_CACHE:-/var/cache/kvm-completion-tracer}"
base_tar="$cache_dir/debian-bookworm-minbase.tar"
max_age_days=30

info() { echo "build-image: $*" >&2; }
die() { echo "build-image: error: $*" >&2; exit 1; }

engine_works() {
    case "$1" in
        docker) command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1 ;;
        podman) command -v podman >/dev/null 2>&1 && timeout 20 podman info >/dev/null 2>&1 ;;
        buildah) command -v buildah >/dev/null 2>&1 && timeout 20 buildah info >/dev/null 2>&1 ;;
        *) return 1 ;;
    esac
}

pick_engine() {
    if [[ -n "${KCT_IMAGE_ENGINE:-}" ]]; then
        engine_works "$KCT_IMAGE_ENGINE" || die "KCT_IMAGE_ENGINE=$KCT_IMAGE_ENGINE does not work here"
        echo "$KCT_IMAGE_ENGINE"
        return
    fi
    local e
    for e in docker podman buildah; do
        if engine_works "$e"; then
            echo "$e"
            return
        fi
    done
    return 1
}

which_only=0
tags=()
for arg in "$@"; do
    case "$arg" in
        --which-engine) which_only=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $arg" ;;
        *) tags+=("$arg") ;;
    esac
done

if ! engine="$(pick_engine)"; then
    [[ $which_only -eq 1 ]] && exit 1
    die "no working container engine (docker daemon, podman or buildah): apt-get install buildah"
fi
if [[ $which_only -eq 1 ]]; then
    echo "$engine"
    exit 0
fi

if [[ ${#tags[@]} -eq 0 ]]; then
    version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/tracer/__init__.py")"
    [[ -n "$version" ]] || die "no __version__ in tracer/__init__.py"
    tags=("kvm-completion-tracer:latest" "kvm-completion-tracer:$version")
fi

have_image() {
    case "$engine" in
        docker) docker image inspect "$1" >/dev/null 2>&1 ;;
        podman) podman image exists "$1" ;;
        buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
    esac
}

make_base_tarball() {
    mkdir -p "$cache_dir"
    if [[ -s "$base_tar" ]] && [[ -z "$(find "$base_tar" -mtime +"$max_age_days")" ]]; then
        info "base: cached $base_tar"
        return
    fi
    command -v mmdebstrap >/dev/null 2>&1 || die "cannot pull $base_image and no mmdebstrap (apt-get install mmdebstrap)"
    info "base: mmdebstrap --variant=minbase bookworm -> $base_tar"
    local tmp="$cache_dir/.partial-$$.tar"
    # The slim image's dpkg excludes (docs, man pages, locales), kept in the image for later
    # apt-get installs; the host's resolv.conf and hostname, which mmdebstrap copies, removed.
    # merged-usr hook: /usr merged by mmdebstrap itself, not by the usrmerge package (which would
    # pull the full perl, ~50 MB).  No apt caches: apt-get clean on every install.
    mmdebstrap --variant=minbase --format=tar --quiet \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --aptopt='DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; }' \
        --aptopt='Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/groff/*' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb "$1"/var/log/apt/* "$1"/var/log/dpkg.log' \
        bookworm "$tmp" "${KCT_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
        || { rm -f "$tmp"; die "mmdebstrap failed"; }
    mv "$tmp" "$base_tar"
}

ensure_base() {
    if have_image "$base_image"; then
        info "base: $base_image (present)"
        return
    fi
    info "base: pulling $base_image"
    case "$engine" in
        docker) timeout 120 docker pull "$base_image" >/dev/null 2>&1 && return ;;
        podman) timeout 120 podman pull -q "$base_image" >/dev/null 2>&1 && return ;;
        buildah) timeout 120 buildah pull -q "$base_image" >/dev/null 2>&1 && return ;;
    esac
    info "base: cannot pull $base_image: making it locally"
    make_base_tarball
    case "$engine" in
        docker) docker import "$base_tar" "$base_image" >/dev/null ;;
        podman) podman import -q "$base_tar" "$base_image" >/dev/null ;;
        buildah)
            # buildah has no import: a container from scratch with the tarball as its root.
            local c mnt
            c="$(buildah from scratch)"
            mnt="$(buildah mount "$c")"
            tar -C "$mnt" -xf "$base_tar"
            buildah umount "$c" >/dev/null
            buildah commit -q --rm "$c" "$base_image" >/dev/null
            ;;
    esac
}

ensure_base

tmpdir="$(mktemp -d)"
trap 'rm -rf "$tmpdir"' EXIT

build_args=(--file "$repo/Dockerfile")
for tag in "${tags[@]}"; do
    build_args+=(--tag "$tag")
done
if [[ "$engine" != docker ]]; then
    build_args+=(--format docker --pull=never --isolation "${BUILDAH_ISOLATION:-chroot}" --layers)
    # buildah newer than Debian 12's 1.28 (Debian 13: 1.39) raises a RUN step's process and
    # file limits to 1048576 for root, which a builder without CAP_SYS_RESOURCE (a sandbox, a
    # CI container) is refused ("setting RLIMIT_NPROC limit ... operation not permitted"): there,
    # RUN steps keep the builder's own limits.  (1.28 lowers them first and must not get these.)
    if ! (ulimit -Hu 1048576 && ulimit -Hn 1048576) 2>/dev/null \
        && [[ "$(printf '%s\n' "$(buildah --version 2>/dev/null | awk '{ print $3 }')" 1.29 \
            | sort -V | head -n1)" == 1.29 ]]; then
        build_args+=(--ulimit "nproc=$(ulimit -Su):$(ulimit -Hu)"
                     --ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)")
    fi
    # pip's CA bundle: the host's (a TLS-intercepting proxy's CA may be only there), mounted at
    # /mnt/host-ca, not at /etc/ssl/certs: python3-venv pulls ca-certificates, whose postinst
    # writes there.  pip reads it through a copy of the host's pip.conf whose `cert` points there.
    if ! /usr/bin/python3 - "$tmpdir/pip.conf" "$tmpdir/ca-dir" <<'PY'
import configparser, os, sys
conf = configparser.ConfigParser(interpolation=None)
conf.read("/etc/pip.conf")
bundle = conf.get("global", "cert", fallback="/etc/ssl/certs/ca-certificates.crt")
if not conf.has_section("global"):
    conf.add_section("global")
if os.path.isfile(bundle):
    bundle = os.path.realpath(bundle)
    conf.set("global", "cert", "/mnt/host-ca/" + os.path.basename(bundle))
    with open(sys.argv[2], "w") as f:
        f.write(os.path.dirname(bundle))
elif conf.has_option("global", "cert"):
    conf.remove_option("global", "cert")
with open(sys.argv[1], "w") as f:
    conf.write(f)
PY
    then
        die "cannot read the host's pip configuration"
    fi
    build_args+=(-v "$tmpdir/pip.conf:/etc/pip.conf:ro")
    if [[ -s "$tmpdir/ca-dir" ]]; then
        build_args+=(-v "$(cat "$tmpdir/ca-dir"):/mnt/host-ca:ro")
    fi
    if command -v apt-config >/dev/null 2>&1; then
        apt-config dump 2>/dev/null | grep -iE '^Acquire::[a-z]+::Proxy' >"$tmpdir/proxy" || true
        if [[ -s "$tmpdir/proxy" ]]; then
            build_args+=(-v "$tmpdir/proxy:/etc/apt/apt.conf.d/99host-proxy:ro")
        fi
    fi
fi

info "$engine build ${tags[*]}"
start=$SECONDS
case "$engine" in
    docker) docker build "${build_args[@]}" "$repo" ;;
    podman) podman build "${build_args[@]}" "$repo" ;;
    buildah) buildah bud "${build_args[@]}" "$repo" ;;
esac
info "built ${tags[0]} with $engine in $((SECONDS - start)) s"
