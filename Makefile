# The newcomer's two commands: `make demo` and `make test`. Each sets up .venv with
# the pinned dependencies (requirements-dev.txt: the runtime pins of requirements.txt
# plus the test and build tools) and builds the extension on a fresh machine by itself.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.ext-built
SOURCES := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
CUDA_ARCHS := sm_80 sm_90

.PHONY: test demo build nvcc-check lint bench clean

$(DEPS): requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Build log kept in .venv; the build configuration lines are shown, the rest on failure.
$(BUILT): $(DEPS) setup.py pyproject.toml $(SOURCES)
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1 \
		|| (tail -n 60 $(VENV)/build.log; exit 1)
	@grep -A3 "transfer_fast build configuration" $(VENV)/build.log || true
	touch $@

build: $(BUILT)

# The CUDA kernels need only CUDA headers, so nvcc checks them even where torch has no
# CUDA; the torch glue is syntax-checked against torch's headers plus the toolkit's.
nvcc-check: $(DEPS)
	@if command -v nvcc >/dev/null 2>&1; then \
		for f in csrc/cuda/*.cu; do for arch in $(CUDA_ARCHS); do \
			echo "nvcc -c -arch=$$arch $$f"; \
			nvcc -c -arch=$$arch -O3 -o /tmp/transfer_fast_$$arch.o $$f || exit 1; \
		done; done; \
		inc=$$($(PY) -c "import torch.utils.cpp_extension as c, sysconfig; \
			dirs = c.include_paths() + [sysconfig.get_paths()['include'], \
			(c.CUDA_HOME or '/usr/local/cuda') + '/include']; print(' '.join('-I' + d for d in dirs))"); \
		for f in csrc/cuda/*.cpp; do echo "g++ -fsyntax-only $$f"; \
			g++ -std=c++20 -fsyntax-only -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE $$inc $$f || exit 1; \
		done; \
	else echo "nvcc not found: CUDA sources not compiled"; fi

lint: $(DEPS)
	$(PY) -m ruff check .

test: build nvcc-check lint
	$(PY) -m pytest -q

demo: build
	$(PY) -m transfer_fast demo --out runs/demo

bench: build
	$(PY) -m pytest benchmarks -q --benchmark-json=$(VENV)/bench.json
	$(PY) benchmarks/ratios.py $(VENV)/bench.json

clean:
	rm -rf build transfer_fast/*.so transfer_fast/_build_info.json $(BUILT)
