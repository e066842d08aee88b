# Datamover — every entry point a developer or CI needs. `make demo` and `make test`
# run `make setup` first, so on a fresh clone each of them is one command.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := qemu-utils libnbd-bin nbdkit fio e2fsprogs postgresql python3-libnbd openjdk-17-jre-headless maven gcc
# The tap's C extension (vib/_fast_writes.c) builds against the Python's headers:
# Debian's python3-dev provides them for Debian's Python (pyenv and the like ship theirs).
PY_HEADERS := $(shell $(PYTHON) -c "import os, sysconfig; print(os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" 2>/dev/null)
ifneq ($(PY_HEADERS),True)
DEB_PACKAGES += python3-dev
endif
# Debian's own Python makes venvs only with python3-venv (ensurepip); pyenv's has it.
PY_ENSUREPIP := $(shell $(PYTHON) -c "import ensurepip; print(True)" 2>/dev/null)
ifneq ($(PY_ENSUREPIP),True)
DEB_PACKAGES += python3-venv
endif
KAFKA_LIB := deploy/kafka/lib

.PHONY: setup deps-deb deps-python deps-kafka demo test lint format bench bench-quick clean lock

setup: deps-deb deps-python deps-kafka

# Debian packages: installed only when one is missing.
deps-deb:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

deps-python: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml setup.py vib/_fast_writes.c deploy/libnbd_into_venv.sh
	@test -x $(PY) && $(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	bash deploy/libnbd_into_venv.sh $(PY)
	@touch $@

deps-kafka: $(KAFKA_LIB)/.installed

$(KAFKA_LIB)/.installed: deploy/kafka/pom.xml
	rm -rf $(KAFKA_LIB)
	mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=lib -DincludeScope=runtime
	@touch $@

lint: deps-python
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: deps-python
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/dmover demo

bench: setup
	$(PY) bench/run_all.py

bench-quick: setup
	$(PY) bench/run_all.py --quick

lock:
	$(PY) -m pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf $(VENV) $(KAFKA_LIB) .mypy_cache .ruff_cache .pytest_cache
