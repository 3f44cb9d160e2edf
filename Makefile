# The two commands (see README.md):
#   make up     install what is needed, then run driftloop's main job
#   make test   install what is needed, then run the test suite
# Both create ./.venv on first use; CI pins exact versions through constraints.txt
# (torch 2.13.0 CPU wheel). On a GPU machine, install a CUDA torch first, then `pip install -e .`.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Label Studio lives in its own environment: its pins clash with driftloop's (pyarrow <25, pytz <2023,
# python-json-logger ==2.0.4, and numpy <2.3 through its SDK's opencv), and it brings Django and ~1 GB
# that the service never needs. driftloop talks to it over its REST API (labels/studio.py).
LS_VENV  ?= .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed
LABEL_STUDIO_VERSION ?= 1.23.2

.PHONY: install prometheus postgres chromium labelstudio up test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (driftloop needs Python 3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# apt_install(package, why): install a Debian package (as root, or through sudo) when the recipe's
# check failed; without apt-get or root, warn and go on (the tests that need it then fail under CI).
define apt_install
  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else SUDO=none; fi; \
  if [ "$$SUDO" = none ] || ! command -v apt-get >/dev/null 2>&1; then \
    echo "warning: install the '$(1)' package $(2)"; \
  else \
    echo "installing the Debian package $(1) ..."; \
    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1) >/dev/null \
      || { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1) >/dev/null; }; \
  fi
endef

labelstudio: $(LS_STAMP)

$(LS_STAMP):
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/python -m pip install --quiet label-studio==$(LABEL_STUDIO_VERSION)
	touch $(LS_STAMP)

# `make up` and the tests start a real Prometheus (Debian package `prometheus`: prometheus + promtool)
# on loopback, with the shipped alert rules.
prometheus:
	@command -v promtool >/dev/null 2>&1 || { $(call apt_install,prometheus,(prometheus, promtool): driftloop up and the tests start it); }

# The browser test opens the operators' pages (Evidently UI, Prometheus alerts) in headless Chromium
# (Debian package `chromium-headless-shell`: the headless build, no display needed).
chromium:
	@command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1 \
	  || { $(call apt_install,chromium-headless-shell,for the browser test of the operators' pages); }

# The storage, service and leader tests start a throwaway PostgreSQL on loopback (tests/pg.py) from the
# Debian package `postgresql` (server binaries in /usr/lib/postgresql/<major>/bin; the tests run initdb
# themselves: no system cluster is used or needed).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(call apt_install,postgresql,for the PostgreSQL storage tests); }

up: install prometheus labelstudio
	$(BIN)/driftloop up

# Two test processes, one file each at a time (--dist loadfile: a file's session parts, Label Studio
# or the PostgreSQL cluster, start once per process): much of the suite waits on servers, scrapes and
# leases while the other process computes; 20.5 min against 31-32 min in one process on 2 cores
# (docs/benchmarks.md "The test suite"). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install prometheus postgres chromium labelstudio
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile

test-fast: install prometheus postgres chromium labelstudio
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile -m "not slow"

bench: install
	$(BIN)/python bench/finetune.py

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache build *.egg-info
