# Two entry points for a fresh machine (see README):
#   make demo   create .venv, install volssl, run the demo on built-in phantoms
#   make test   create .venv, install volssl + test tools, run the test suite
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
DEMO_OUT ?= volssl_demo
# constraints.txt pins every tested version, torch included, so no requirement can replace the
# installed torch with a newer (CUDA) build. Where a local wheel folder exists, pip looks there first.
PIP      := $(BIN)/python -m pip
PIPFLAGS := -c constraints.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP    := $(VENV)/.volssl-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q $(PIPFLAGS) "torch==$$(sed -n 's/^torch==//p' constraints.txt)"
	$(PIP) install -q $(PIPFLAGS) -e '.[test]'
	# nnU-Net v2's loader and its network classes, without their dependencies: the export test loads into them
	$(PIP) install -q $(PIPFLAGS) --no-deps nnunetv2 dynamic-network-architectures
	$(BIN)/python scripts/check_env.py
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/volssl demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) build src/*.egg-info
