# NovaSandbox developer targets.
#
#   make deps     install the host packages image builds and QEMU tests need (Debian)
#   make agent    build the static guest agent (baked into every rootfs)
#   make agent-arm64  the same agent cross-built for aarch64 (arm64 templates)
#   make images-arm64 build `minimal-arm64` (arm64 kernel, busybox, agent) into $NOVA_HOME
#                 (cached; the cold arm64 kernel build is the long part)
#   make images   build the `minimal` and `python` templates into $NOVA_HOME (cached:
#                 a second run is a cache hit and takes seconds)
#   make bench-boot   boot our kernel and Debian's cloud kernel, print time to init
#   make demo     boot a sandbox, run python3 in it, print the boot time (README's first command)
#   make mcp-test a real MCP client (PyPI `mcp`, in a venv cached under target/) drives `nova mcp`
#   make test     everything CI runs: deps, images, fmt, clippy, tests, examples (README's second)
#   make sdk-test the Python SDK: ruff, mypy, pytest against a real daemon, its examples
#   make api-fuzz Schemathesis against a real `nova serve` from the checked-in OpenAPI document
#                 (~2-3 minutes; part of `make test`). The daemon's end-to-end API tests alone:
#                 cargo test -p nova-cli --test api   (each test boots its own daemon and 1-3 VMs)
#   make fuzz     run every fuzz target FUZZ_S seconds (default 60) on its kept corpus
#   make fuzz-ci  the short pass `make test` runs: every target FUZZ_CI_S seconds from its seeds
#   make check-macos  cargo check + clippy of the Apple VZ backend, the facade, the CLI (and the
#                 runtime and nova-net they stand on) for
#                 aarch64-apple-darwin (SKIP without that target; not part of `make test`)
#   make sign-macos   on a Mac: build, then sign the VZ helper with contrib/macos/nova.entitlements

SHELL := /bin/bash
CARGO ?= cargo
AGENT_TARGET := x86_64-unknown-linux-gnu
# Build outputs follow CARGO_TARGET_DIR when it is set, as cargo does.
AGENT_BIN := $(or $(CARGO_TARGET_DIR),target)/$(AGENT_TARGET)/agent/nova-agent
ARM64_AGENT_TARGET := aarch64-unknown-linux-gnu
ARM64_AGENT_BIN := $(or $(CARGO_TARGET_DIR),target)/$(ARM64_AGENT_TARGET)/agent/nova-agent
NOVA := $(or $(CARGO_TARGET_DIR),target)/debug/nova
TEMPLATES ?= minimal python

# Host packages: QEMU (TCG fallback and tests), the kernel source and its build
# tools, debootstrap, busybox-static and e2fsprogs for the rootfs images, and
# nftables (the `nft` binary nova-net applies its rules with); docker-registry
# and skopeo for the OCI import tests (a registry on 127.0.0.1); passt for the
# user-mode (rootless) sandbox network.
DEPS_PACKAGES := qemu-system-x86 linux-source-6.1 debootstrap debian-archive-keyring \
	busybox-static e2fsprogs bc flex bison libelf-dev libssl-dev build-essential \
	xz-utils fakeroot nftables python3 python3-venv curl docker-registry skopeo \
	qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross passt
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: deps agent agent-arm64 images-arm64 nova images bench-boot demo test lint examples sdk-test \
	sdk-venv mcp-test api-fuzz e2b-test fuzz-tools fuzz-build fuzz fuzz-ci check-macos sign-macos

deps:
	@missing=$$(for p in $(DEPS_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	done); \
	if [ -z "$$missing" ]; then echo "deps: all host packages present"; else \
		echo "deps: installing $$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing || { \
			$(SUDO) apt-get update && \
			$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; }; \
	fi
	@rustup target list --installed 2>/dev/null | grep -qx $(AGENT_TARGET) || rustup target add $(AGENT_TARGET) || true
	@rustup target list --installed 2>/dev/null | grep -qx $(ARM64_AGENT_TARGET) || rustup target add $(ARM64_AGENT_TARGET) || true

agent:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build -p nova-agent --profile agent --target $(AGENT_TARGET)

# The agent for arm64 guests: static, linked by Debian's aarch64 cross gcc.
agent-arm64:
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	RUSTFLAGS="-C target-feature=+crt-static" \
	$(CARGO) build -p nova-agent --profile agent --target $(ARM64_AGENT_TARGET)

# `minimal-arm64`: booted under qemu-system-aarch64 -M virt (TCG) by
# crates/nova-qemu/tests/arm64.rs; with its snapshot, as the x86_64 templates.
images-arm64: agent-arm64 nova
	$(NOVA) template build minimal --arch arm64 --agent $(ARM64_AGENT_BIN)

nova:
	$(CARGO) build --quiet -p nova-cli

images: agent nova
	@for t in $(TEMPLATES); do $(NOVA) template build $$t --agent $(AGENT_BIN) || exit 1; done

bench-boot: images
	$(CARGO) bench -p nova-images --bench boot

# The README's main command: a real microVM from the python template.
demo: deps images
	$(NOVA) run --template python -- python3 -c "import platform; print('Hello from a NovaSandbox microVM, Python', platform.python_version(), 'on', platform.release())"

lint:
	$(CARGO) fmt --all --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --quiet

# The seed's examples, against real sandboxes.
examples: images
	NOVA_EXAMPLE_TEMPLATE=python $(CARGO) run --quiet -p novasandbox --example basic
	NOVA_EXAMPLE_TEMPLATE=minimal $(CARGO) run --quiet -p novasandbox --example parallel
	NOVA_EXAMPLE_TEMPLATE=python $(CARGO) run --quiet -p novasandbox --example monitor

# The Python SDK (sdk/python): a cached venv with the package and pinned
# tools, then lint, types, the pytest suite against a real `nova serve` on a
# temporary NOVA_HOME, and the seed's examples (which start their own daemon).
SDK_VENV ?= target/sdk-venv
SDK_NOVA := $(abspath $(or $(CARGO_TARGET_DIR),target))/debug/nova
SDK_TOOLS := ruff==0.17.6 mypy==2.4.1
SDK_SOURCES := sdk/python/pyproject.toml $(shell find sdk/python/src -name '*.py' -o -name py.typed 2>/dev/null)

$(SDK_VENV)/.installed: $(SDK_SOURCES)
	@test -x $(SDK_VENV)/bin/python || python3 -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/pip install --quiet --disable-pip-version-check "./sdk/python[test]" $(SDK_TOOLS)
	@touch $@

sdk-venv: $(SDK_VENV)/.installed

sdk-test: nova sdk-venv
	cd sdk/python && ../../$(SDK_VENV)/bin/ruff check . && ../../$(SDK_VENV)/bin/ruff format --check .
	cd sdk/python && ../../$(SDK_VENV)/bin/mypy
	cd sdk/python && NOVA_BIN=$(SDK_NOVA) ../../$(SDK_VENV)/bin/python -m pytest -q -p no:cacheprovider --benchmark-disable
	cd sdk/python && NOVA_BIN=$(SDK_NOVA) ../../$(SDK_VENV)/bin/python tests/run_examples.py

# The MCP round trip over stdio with the official Python client. The venv is
# cached (a second run reuses it); the templates are the ones `images` built.
MCP_VENV ?= target/mcp-venv
MCP_PACKAGE := mcp>=2.3,<3
MCP_NOVA := $(abspath $(or $(CARGO_TARGET_DIR),target))/debug/nova
mcp-test: nova images
	@if ! $(MCP_VENV)/bin/python -c 'import mcp' 2>/dev/null; then \
		echo "mcp-test: making $(MCP_VENV) with $(MCP_PACKAGE)"; \
		python3 -m venv $(MCP_VENV) || { echo "mcp-test: python3 -m venv failed: apt-get install python3-venv"; exit 1; }; \
		$(MCP_VENV)/bin/pip install --quiet --disable-pip-version-check '$(MCP_PACKAGE)' || exit 1; \
	fi
	@templates="$${NOVA_TEMPLATES_DIR:-$$($(MCP_NOVA) mcp --print-templates-dir)}"; \
		$(MCP_VENV)/bin/python tests/mcp/stdio_roundtrip.py $(MCP_NOVA) "$$templates"
# The daemon's HTTP API fuzzed by Schemathesis from crates/nova-server/openapi.json: no 5xx,
# every response as documented. See scripts/api-fuzz.sh (venv, policy, cleanup).
api-fuzz: nova
	NOVA=$(NOVA) scripts/api-fuzz.sh

# The unmodified `e2b` SDKs (PyPI and npm, pinned in the script) against
# `nova serve --e2b-listen` on loopback with a private NOVA_HOME.
e2b-test: nova
	tests/e2b/run.sh

# macOS: the Apple VZ backend (crates/nova-vz) type-checked against the real
# objc2-virtualization API, with the facade and the CLI. No Mac here: check and
# clippy only (linking needs Apple's SDK). Run it before committing changes to
# those crates; CI does not depend on it.
MACOS_TARGET := aarch64-apple-darwin
MACOS_CRATES := -p nova-vz -p novasandbox -p nova-cli
# What they stand on, library only (their tests and examples are Linux's).
MACOS_LIB_CRATES := -p nova-runtime -p nova-net
# The target's standard library in the active toolchain (what cargo needs;
# `rustup target list --installed` can miss a target another rustup added).
MACOS_STD = $(shell rustc --print sysroot 2>/dev/null)/lib/rustlib/$(MACOS_TARGET)/lib
check-macos:
	@if [ -d "$(MACOS_STD)" ]; then \
		$(CARGO) check --target $(MACOS_TARGET) $(MACOS_CRATES) --all-targets && \
		$(CARGO) clippy --target $(MACOS_TARGET) $(MACOS_CRATES) --all-targets -- -D warnings && \
		$(CARGO) clippy --target $(MACOS_TARGET) $(MACOS_LIB_CRATES) --lib -- -D warnings; \
	else \
		echo "SKIP: check-macos: the $(MACOS_TARGET) target is not installed (rustup target add $(MACOS_TARGET))"; \
	fi

# On a Mac: VZ refuses to make VMs in a process without the virtualization
# entitlement; the process that makes them is the helper, nova-vz-vmm. Ad hoc
# signature (-s -): enough to run locally.
MACOS_BIN_DIR ?= $(or $(CARGO_TARGET_DIR),target)/debug
sign-macos:
	$(CARGO) build -p nova-cli -p nova-vz
	codesign --force --sign - --entitlements contrib/macos/nova.entitlements $(MACOS_BIN_DIR)/nova-vz-vmm

# Fuzzing (fuzz/, cargo-fuzz on the nightly toolchain; see fuzz/README.md).
# Builds are release with debug assertions and overflow checks on (-a), and
# without AddressSanitizer (-s none): the crates fuzzed have no unsafe code
# of their own, so a panic is what a finding looks like, and the build and
# the runs are several times faster. A crash leaves its input in
# fuzz/artifacts/<target>/ and the run fails after trying every target.
FUZZ_S ?= 60
FUZZ_CI_S ?= 15
FUZZ_TARGETS ?= agent_client_frames agent_client_session agent_request_frames agent_dispatch qmp_replies \
	firecracker_api firecracker_metrics sandbox_config server_requests policy_toml oci_layer
FUZZ := cargo +nightly fuzz
# The fuzz build lives outside the clone, beside the other cached artifacts
# ($NOVA_HOME/cache), so a fresh clone rebuilds only what changed.
FUZZ_TARGET_DIR ?= $(or $(NOVA_HOME),$(if $(filter 0,$(shell id -u)),/var/lib/nova,$(HOME)/.local/share/nova))/cache/fuzz-target
FUZZ_BUILD_FLAGS := -s none -a --target-dir $(FUZZ_TARGET_DIR)
FUZZ_RUN_FLAGS := -max_len=65536 -rss_limit_mb=2048 -timeout=30 -print_final_stats=1

fuzz-tools:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked

fuzz-build: fuzz-tools
	$(FUZZ) build $(FUZZ_BUILD_FLAGS)

# $(1): seconds per target; $(2): corpus root (each target's corpus is
# $(2)/<target>, started from fuzz/seeds/<target>, with the dictionary
# fuzz/dicts/<target>.dict where there is one; its log is $(2)/<target>.log).
define fuzz_all
	@failed=""; for t in $(FUZZ_TARGETS); do \
		mkdir -p $(2)/$$t && cp -n fuzz/seeds/$$t/* $(2)/$$t/ 2>/dev/null; \
		echo "--- fuzz $$t for $(1) s"; \
		dict=; test -f fuzz/dicts/$$t.dict && dict=-dict=fuzz/dicts/$$t.dict; \
		if $(FUZZ) run $(FUZZ_BUILD_FLAGS) $$t $(2)/$$t -- $(FUZZ_RUN_FLAGS) $$dict \
			-max_total_time=$(1) >$(2)/$$t.log 2>&1; then \
			grep -E '^(#[0-9]+[[:space:]]+DONE|Done [0-9]+ runs)' $(2)/$$t.log; \
		else tail -n 40 $(2)/$$t.log; failed="$$failed $$t"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in:$$failed (inputs in fuzz/artifacts/)"; exit 1; fi
endef

# Kept corpora under fuzz/corpus/ (not checked in): each run goes on from the last.
fuzz: fuzz-build
	$(call fuzz_all,$(FUZZ_S),fuzz/corpus)

# From the seeds only, in a fresh directory, so CI's pass does not depend on
# what ran before.
fuzz-ci: fuzz-build
	@rm -rf fuzz/corpus-ci
	$(call fuzz_all,$(FUZZ_CI_S),fuzz/corpus-ci)
	@rm -rf fuzz/corpus-ci

# The README's test command, and what CI runs: installs what the tests need,
# builds the images (cached), then runs every test and example.
test: deps images images-arm64 lint
	$(CARGO) test --workspace
	$(MAKE) api-fuzz
	$(MAKE) fuzz-ci
	@echo "--- tests gated on NOVA_FIRECRACKER_BIN / NOVA_TEST_KVM=1 (SKIP lines mean they did not run here):"
	@$(CARGO) test -q -p nova-firecracker --test firecracker -- --nocapture 2>&1 | grep -E '^(SKIP|test result)' || true
	$(MAKE) examples
	$(MAKE) sdk-test
	$(MAKE) mcp-test
	$(MAKE) e2b-test
	@echo "--- the seed's benchmark table, small N (figures printed, not asserted):"
	$(NOVA) bench seed -n 3
	@echo "--- 100 create/exec/file/stop cycles with a leak ledger (fails on a leak):"
	$(NOVA) bench soak -n 100
