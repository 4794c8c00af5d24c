#!/usr/bin/env bash
# `make base-image`: a Debian 12 base image built from Debian's packages alone (mmdebstrap, then imported into
# the container engine), for machines that can reach a Debian mirror but not a public image registry:
#   make images PYTHON_IMAGE=$(deploy/docker/debian-base.sh)
# Prints the image's name as its last line. The tag is a hash of the recipe (suite, packages, this script), so
# an image built before from the same recipe is reused: the first run takes about a minute, later ones none.
#
# Settings (environment): ENGINE (podman or docker; podman when installed), SUITE (bookworm), PACKAGES (comma-
# separated; the default is what Dockerfile.cpu needs), NAME (localhost/seqserve-debian). Needs root (mmdebstrap).
set -euo pipefail
ENGINE=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
SUITE=${SUITE:-bookworm}
PACKAGES=${PACKAGES:-python3,python3-venv,ca-certificates}
NAME=${NAME:-localhost/seqserve-debian}

recipe="$SUITE $PACKAGES $(sha256sum < "${BASH_SOURCE[0]}")"
image="$NAME:$SUITE-$(printf '%s' "$recipe" | sha256sum | cut -c1-12)"
if "$ENGINE" image inspect "$image" >/dev/null 2>&1; then
    echo "$image"
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is not installed (Debian package mmdebstrap)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building $image from Debian $SUITE packages: $PACKAGES" >&2
# Documentation, manuals and translations are left out: an image has no reader for them.
mmdebstrap --quiet --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$work/rootfs.tar" >&2
"$ENGINE" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" "$image" >/dev/null
echo "$image"
