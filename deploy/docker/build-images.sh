#!/usr/bin/env bash
# `make images`: the CPU image, and the GPU image where its CUDA base image can be pulled (or is present).
#
# Settings (environment; `make images VAR=...` passes them):
#   ENGINE        podman or docker (podman when installed)
#   IMAGES        which to build: "cpu gpu" (default), "cpu" or "gpu"
#   TAG           image name; the images are TAG:cpu and TAG:gpu (default seqserve, as docker-compose.yml names them)
#   PYTHON_IMAGE  the CPU image's base (Dockerfile.cpu's default; `make base-image` builds one from Debian packages)
#   CUDA_IMAGE    the GPU image's base (Dockerfile.gpu's default; its CUDA major must match onnxruntime-gpu's)
#   PIP_CONFIG    a pip.conf for the build (a private index, its credentials, a proxy): a build secret
#   PIP_CA        a CA bundle for pip inside the build (a TLS-inspecting proxy, a private CA): a build secret
# The two secrets are mounted for the pip steps only and never stored in a layer.
set -euo pipefail
cd "$(dirname "$0")/../.."
ENGINE=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
IMAGES=${IMAGES:-cpu gpu}
TAG=${TAG:-seqserve}
PYTHON_IMAGE=${PYTHON_IMAGE:-$(sed -n 's/^ARG PYTHON_IMAGE=//p' deploy/docker/Dockerfile.cpu)}
CUDA_IMAGE=${CUDA_IMAGE:-$(sed -n 's/^ARG CUDA_IMAGE=//p' deploy/docker/Dockerfile.gpu)}
PIP_CONFIG=${PIP_CONFIG:-}
PIP_CA=${PIP_CA:-}

say() { echo "make images: $*" >&2; }

# A base that is neither present nor pullable stops a CPU build; the GPU image is skipped without its base.
have_base() {
    "$ENGINE" image inspect "$1" >/dev/null 2>&1 && return 0
    say "pulling $1"
    "$ENGINE" pull "$1" >&2
}

# Podman as root raises each container's open-files limit to the kernel's maximum; a host that forbids it
# fails every RUN step ("error setting rlimits"). Then keep podman's own limits (deploy/podman/containers.conf).
check_rlimits() {
    [ "$ENGINE" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] || return 0
    local output
    if ! output=$(podman run --rm --pull=never --entrypoint /bin/sh "$1" -c true 2>&1); then
        if grep -q "error setting rlimits" <<<"$output"; then
            export CONTAINERS_CONF="$PWD/deploy/podman/containers.conf"
            say "podman cannot raise containers' open-files limit on this host: using CONTAINERS_CONF=$CONTAINERS_CONF"
        else
            say "podman cannot run $1: $output"
            return 1
        fi
    fi
}

secrets=()
for pair in "pip.conf=$PIP_CONFIG" "pip-ca=$PIP_CA"; do
    id=${pair%%=*} file=${pair#*=}
    [ -n "$file" ] || continue
    [ -r "$file" ] || { say "cannot read $file (for the $id build secret)"; exit 1; }
    secrets+=(--secret "id=$id,src=$file")
done

build() {  # KIND BASE_ARG BASE
    local flags=(--file "deploy/docker/Dockerfile.$1" --tag "$TAG:$1" --build-arg "$2=$3" "${secrets[@]}")
    if [ "$ENGINE" = podman ]; then
        flags+=(--format docker)  # the OCI format has no HEALTHCHECK
    else
        export DOCKER_BUILDKIT=1  # RUN --mount
    fi
    say "building $TAG:$1 on $3 with $ENGINE${secrets:+ (pip secrets: ${PIP_CONFIG:+pip.conf }${PIP_CA:+pip-ca})}"
    "$ENGINE" build "${flags[@]}" .
}

for kind in $IMAGES; do
    case $kind in
        cpu)
            have_base "$PYTHON_IMAGE" || { say "cannot pull $PYTHON_IMAGE: build a local base with" \
                "\`make base-image\` and pass it as PYTHON_IMAGE (docs/operations.md)"; exit 1; }
            check_rlimits "$PYTHON_IMAGE"
            build cpu PYTHON_IMAGE "$PYTHON_IMAGE" ;;
        gpu)
            if ! have_base "$CUDA_IMAGE"; then
                say "skipped $TAG:gpu: its base $CUDA_IMAGE cannot be pulled here (set CUDA_IMAGE to one you have)"
                continue
            fi
            check_rlimits "$CUDA_IMAGE"
            build gpu CUDA_IMAGE "$CUDA_IMAGE" ;;
        *) say "unknown image kind '$kind' (cpu or gpu)"; exit 1 ;;
    esac
done
