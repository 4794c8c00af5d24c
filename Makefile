# The README's two commands: `make serve` (set up, then serve the default repository) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := trans-de-en fortunes fortunes-min prometheus docker-compose

.PHONY: setup setup-system serve test lint proto

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in the [train] extra; the local CPU wheel satisfies it without CUDA downloads.
	$(PY) -m pip install -q -e '.[train,dev]'
	touch $@

setup: $(VENV)/.installed

# Debian packages for the corpora and the Prometheus scrape test (root, or sudo, needed once).
setup-system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

serve: setup
	$(VENV)/bin/seqserve serve

test: setup setup-system
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

proto: setup
	bash proto/generate.sh
