# The README's two commands: `make run` (the walkthrough on one machine) and `make test`.
# Both set everything up first; set-up is idempotent and skips work already done.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
# Only `make test` needs these: tests/deploy/test_image.py builds the image and runs it.
TEST_APT_PACKAGES := podman mmdebstrap runc
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup run test lint stubs bench
setup: $(STAMP)

define apt_install
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

$(STAMP): pyproject.toml
	$(call apt_install,$(APT_PACKAGES))
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

run: setup
	$(VENV)/bin/fusecsi dev $(ARGS)

lint: setup
	$(VENV)/bin/ruff check fusecsi tests benchmarks scripts
	$(VENV)/bin/ruff format --check fusecsi tests benchmarks scripts

test: lint
	$(call apt_install,$(TEST_APT_PACKAGES))
	@if [ -x scripts/install-helm.sh ]; then scripts/install-helm.sh; fi
	$(PY) -m pytest $(PYTEST_ARGS)

stubs: setup
	$(PY) scripts/gen_stubs.py

bench: setup
	$(PY) benchmarks/run_all.py
