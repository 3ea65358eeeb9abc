# ckptfs: `make demo` runs the main job on an embedded S3 endpoint; `make test` runs `make lint` (ruff, mypy on
# gateway/ and mount/), then the test suite. Both install what they need on a fresh Debian machine (as root): fuse3 and a virtualenv in .venv.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench deps venv clean

deps:
	@command -v fusermount3 >/dev/null && [ -e /usr/include/fuse3/fuse.h ] && command -v pkg-config >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse3-dev pkg-config >/dev/null; }
	@command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	  || echo "ckptfs: promtool (Debian package prometheus) not installed; the alert-rule checks will be skipped"
	@[ -e /dev/fuse ] || { echo "ckptfs: /dev/fuse is missing (load the fuse module or run the container with --device /dev/fuse)"; exit 1; }
	@# pjdfstest (tests/test_posix_conformance.py) is built from tests/conformance/ with these
	@command -v autoreconf >/dev/null && command -v gcc >/dev/null && command -v make >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq autoconf automake libtool gcc make perl >/dev/null; }

$(STAMP): pyproject.toml
	$(MAKE) deps
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,jax]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m scripts.demo

lint: $(STAMP)
	$(PY) -m ruff check gateway mount
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --slow tests

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info
