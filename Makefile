# The README's two commands: `make run` (the walkthrough on one machine) and `make test`.
# Both set everything up first; set-up is idempotent and skips work already done.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
# Only `make test` needs these: tests/deploy/test_image.py builds the image and runs it.
# (`make bench` adds fio: benchmarks/fuse_io.py drives its I/O with it.)
# redis-server: the JuiceFS tests' metadata engine (tests/engines/juicefs/backend.py).
TEST_APT_PACKAGES := podman mmdebstrap runc redis-server
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup run test lint stubs bench
setup: $(STAMP)

# waits for apt's locks (a fresh cloud machine holds them for minutes after boot)
define apt_install
	@scripts/apt-install.sh $(1)
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
	$(call apt_install,fio)
	$(PY) benchmarks/run_all.py
