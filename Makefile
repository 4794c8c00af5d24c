# The README's two commands: `make serve` (set up, then serve the default repository) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
APT_PACKAGES := trans-de-en fortunes fortunes-min prometheus docker-compose redis-server nginx \
	podman podman-compose mmdebstrap
# `make images`: the container engine (podman when installed, else docker), the images' bases (empty: the
# Dockerfiles' defaults), and pip's configuration and CA bundle for the build, passed as build secrets (empty:
# none; PIP_CA defaults to the CA bundle pip on this machine is configured with, if any). docs/operations.md.
ENGINE ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
IMAGES ?= cpu gpu
PYTHON_IMAGE ?=
CUDA_IMAGE ?=
PIP_CONFIG ?=
PIP_CA ?= $(or $(PIP_CERT),$(shell $(PYTHON) -m pip config get global.cert 2>/dev/null))

.PHONY: setup setup-system serve test lint proto images base-image

# The server alone: no torch.
$(VENV)/.installed-serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

# Training, export and the test tools. torch is pinned in the [train] extra (torch==2.13.0): the
# local CPU wheel satisfies it without gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml $(VENV)/.installed-serve
	$(PY) -m pip install -q -e '.[train,dev,bench]'
	touch $@

# protobuf 7 beside the venv's protobuf 6 (tritonclient[grpc] pins <7): tests/proto/test_protobuf_versions.py
# runs the server with it first on the path, so the stubs are tested on both majors.
$(VENV)/protobuf7/.installed: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/protobuf7 'protobuf>=7.35.1,<8'
	touch $@

setup: $(VENV)/.installed $(VENV)/protobuf7/.installed

# Debian packages for the corpora, the Prometheus scrape test, the real redis-server and nginx the session
# tests start, and podman, podman-compose and mmdebstrap for the image and compose tests (root, or sudo,
# needed once).
setup-system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

serve: $(VENV)/.installed-serve
	$(VENV)/bin/seqserve serve --host $(HOST)

test: setup setup-system
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

proto: setup
	bash proto/generate.sh

# The CPU image, and the GPU image where its CUDA base can be pulled (deploy/docker/build-images.sh).
images:
	ENGINE='$(ENGINE)' IMAGES='$(IMAGES)' PYTHON_IMAGE='$(PYTHON_IMAGE)' CUDA_IMAGE='$(CUDA_IMAGE)' \
	  PIP_CONFIG='$(PIP_CONFIG)' PIP_CA='$(PIP_CA)' deploy/docker/build-images.sh

# A Debian 12 base with Python from Debian's packages, for machines that cannot pull public images:
#   make images PYTHON_IMAGE=$$(make -s base-image)
base-image:
	@ENGINE='$(ENGINE)' deploy/docker/debian-base.sh
