# NovaSandbox developer targets.
#
#   make deps     install the host packages image builds and QEMU tests need (Debian)
#   make agent    build the static guest agent (baked into every rootfs)
#   make images   build the `minimal` and `python` templates into $NOVA_HOME (cached:
#                 a second run is a cache hit and takes seconds)
#   make bench-boot   boot our kernel and Debian's cloud kernel, print time to init
#   make demo     boot a sandbox, run python3 in it, print the boot time (README's first command)
#   make test     everything CI runs: deps, images, fmt, clippy, tests, examples (README's second)

SHELL := /bin/bash
CARGO ?= cargo
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/agent/nova-agent
NOVA := target/debug/nova
TEMPLATES ?= minimal python

# Host packages: QEMU (TCG fallback and tests), the kernel source and its build
# tools, debootstrap, busybox-static and e2fsprogs for the rootfs images, and
# nftables (the `nft` binary nova-net applies its rules with).
DEPS_PACKAGES := qemu-system-x86 linux-source-6.1 debootstrap debian-archive-keyring \
	busybox-static e2fsprogs bc flex bison libelf-dev libssl-dev build-essential \
	xz-utils fakeroot nftables
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: deps agent nova images bench-boot demo test lint examples e2b-test

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

agent:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build -p nova-agent --profile agent --target $(AGENT_TARGET)

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
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --quiet

# The seed's examples, against real sandboxes.
examples: images
	NOVA_EXAMPLE_TEMPLATE=python $(CARGO) run --quiet -p novasandbox --example basic
	NOVA_EXAMPLE_TEMPLATE=minimal $(CARGO) run --quiet -p novasandbox --example parallel
	NOVA_EXAMPLE_TEMPLATE=python $(CARGO) run --quiet -p novasandbox --example monitor

# The unmodified `e2b` SDKs (PyPI and npm, pinned in the script) against
# `nova serve --e2b-listen` on loopback with a private NOVA_HOME.
e2b-test: nova
	tests/e2b/run.sh

# The README's test command, and what CI runs: installs what the tests need,
# builds the images (cached), then runs every test and example.
test: deps images lint
	$(CARGO) test --workspace
	@echo "--- tests gated on NOVA_FIRECRACKER_BIN / NOVA_TEST_KVM=1 (SKIP lines mean they did not run here):"
	@$(CARGO) test -q -p nova-firecracker --test firecracker -- --nocapture 2>&1 | grep -E '^(SKIP|test result)' || true
	$(MAKE) examples
	$(MAKE) e2b-test
	@echo "--- the seed's benchmark table, small N (figures printed, not asserted):"
	$(NOVA) bench seed -n 3
