# mmfree-fpga: every entry point sets itself up. `make demo` and `make test` are the two
# commands of the README; both work on a fresh Debian machine with Python 3.11.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
MODEL   ?= models/shipped/tiny-fortunes/tiny-fortunes.mmf
PROMPT  ?= Love is
# the CPU build of torch that lies on disk on the project's machines; only tests and training use it
TORCH   ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help setup setup-test system-deps demo test bench train bitstream clean

help:
	@echo "make demo     set up, then generate text with the shipped tiny model on the simulated board"
	@echo "make test     set up (venv, torch CPU, Debian packages), then run the whole test suite"
	@echo "make bench    print benchmark figures (golden-model tokens/s)"
	@echo "make train    retrain the tiny model into runs/ (TRAIN_ARGS=... for options; see --help)"
	@echo "make bitstream BOARD=icebreaker   build the board's bitstream (BUILD_ARGS=--program ...)"
	@echo "make clean    remove the virtual environment and build outputs"

$(PY):
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
	  else echo "error: '$(PYTHON) -m venv' failed; install python3-venv (apt-get install python3-venv)" >&2; exit 1; fi; }

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[train]"
	@touch $@

setup: $(VENV)/.installed

# Debian packages the tests need: the corpus of the shipped model (fortunes, fortunes-min),
# Icarus Verilog for the cocotb testbenches and Verilator for the simulated board.
SYSTEM_PACKAGES := fortunes fortunes-min iverilog verilator
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "error: the tests need the Debian packages$$missing; run: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

setup-test: $(VENV)/.installed-test system-deps

# The main job: the accelerator's gateware, compiled with Verilator, generates text behind its
# serial port; the host library loads the model and streams the tokens.
demo: setup system-deps
	$(VENV)/bin/mmfree demo --model $(MODEL) --max-tokens 200 --temperature 0.7 --seed 2 "$(PROMPT)"

test: setup-test
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "error: pytest collected no tests; the suite must not be empty" >&2; exit 1; fi; \
	exit $$rc

bench: setup
	$(PY) bench/golden_speed.py --model $(MODEL)

# QAT training from scratch (the shipped model: see models/shipped/tiny-fortunes/README.md; it
# took 330 s on an H200 with TRAIN_ARGS="--batch 512 --lr 1.6e-2 --warmup 300 --time-budget 330 --compile")
TRAIN_ARGS ?=
train: setup-test
	$(PY) -m mmfree.models.train --out runs/tiny-fortunes $(TRAIN_ARGS)

# the accelerator's bitstream for a board (minutes); BUILD_ARGS: --lanes N --clock-mhz F --program
BOARD ?= icebreaker
BUILD_ARGS ?=
bitstream: setup
	$(VENV)/bin/mmfree build --board $(BOARD) $(BUILD_ARGS)

clean:
	rm -rf $(VENV) build sim_build .pytest_cache
