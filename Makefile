# Two commands do everything:  `make demo` (set up + run the kanji demo), `make test` (set up + tests).
# The virtualenv lives in .venv. A torch you already have (e.g. your CUDA build, visible through
# --system-site-packages) is kept; otherwise TORCH_SPEC is installed (this project's CI pins the
# CPU wheel that its machines serve).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := kanjidic-xml fonts-ipafont-gothic fonts-ipafont-mincho fonts-seto
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup system-deps demo test test-fast clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# Debian packages for the kanji dataset (dictionary + fonts). Skipped when already present.
system-deps:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(APT_PACKAGES); \
	fi

demo: setup system-deps
	$(PY) kanji_demo.py --output_dir demo_output

test: setup system-deps
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_output

-include Makefile.xla
