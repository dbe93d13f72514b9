# ebb: the two commands of the quick start are `make demo` and `make test`.
# Everything here uses Debian's /usr/bin/python3 (3.11) and its python3-* packages.
PY      ?= /usr/bin/python3
BUILD   ?= build
WERROR  ?= OFF
CMAKE_FLAGS ?=
LINT_FLAGS ?=

.PHONY: all deps build unit integration cpython test demo bench bench-memory bench-speed bench-micro bench-preload \
        install format format-check lint clean

all: build

deps:
	scripts/install-deps

$(BUILD)/build.ninja: CMakeLists.txt
	cmake -S . -B $(BUILD) -G Ninja -DEBB_WERROR=$(WERROR) $(CMAKE_FLAGS)

build: deps $(BUILD)/build.ninja
	cmake -S . -B $(BUILD) -DEBB_WERROR=$(WERROR) > /dev/null
	cmake --build $(BUILD)

unit: build
	ctest --test-dir $(BUILD) --output-on-failure

integration: build
	EBB_REQUIRE_LIB=1 EBB_LIB=$(CURDIR)/$(BUILD)/lib/libebb.so $(PY) -m pytest -q tests/integration

cpython: build
	$(PY) tests/cpython/run_cpython_tests.py --lib $(CURDIR)/$(BUILD)/lib/libebb.so

test: unit integration cpython

# ebb's main job on a bundled example: the same leaky 4-worker fleet with and
# without ebb run, side by side, with a table and a plot of fleet PSS.
demo: build
	@mkdir -p $(BUILD)/demo
	$(PY) examples/fleet_demo.py --ebb $(BUILD)/bin/ebb --out $(BUILD)/demo

bench: bench-memory bench-speed bench-micro bench-preload

bench-memory: build
	EBB_LIB=$(CURDIR)/$(BUILD)/lib/libebb.so $(PY) bench/run_memory.py --runs 3

bench-speed: build
	EBB_LIB=$(CURDIR)/$(BUILD)/lib/libebb.so $(PY) bench/run_speed.py --runs 5

bench-preload: build
	EBB_LIB=$(CURDIR)/$(BUILD)/lib/libebb.so $(PY) bench/preload.py --runs 3

bench-micro: build
	EBB_LIB=$(CURDIR)/$(BUILD)/lib/libebb.so $(PY) bench/run_micro.py $(BUILD)/bin/ebb_micro_bench

install: build
	cmake --install $(BUILD) --prefix $(or $(PREFIX),/usr/local)

SOURCES = $(shell git ls-files '*.cc' '*.h')
format:
	clang-format -i $(SOURCES)
format-check: deps
	clang-format --dry-run --Werror $(SOURCES)
lint: build
	clang-tidy -p $(BUILD) --quiet $(LINT_FLAGS) $(filter %.cc,$(SOURCES))

clean:
	rm -rf $(BUILD)
