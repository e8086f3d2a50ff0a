# sandbox-operator: the two commands a newcomer needs are `make demo` and `make test`.
# Everything they need is installed into a cache outside the repository ($(CACHE)), once.

SHELL := /bin/bash
CARGO ?= cargo
CACHE ?= $(or $(SANDBOX_OPERATOR_CACHE),$(HOME)/.cache/sandbox-operator)
export SANDBOX_OPERATOR_CACHE := $(CACHE)
# The image the chart-on-a-node test runs: the same layout as `make image`, from the dev profile
# (its dependencies are the tests' own build; a release build of them would add most of an hour on
# a 2-core machine). TEST_IMAGE_PROFILE=release tests the release image.
TEST_IMAGE_PROFILE ?= dev
TEST_IMAGE := $(or $(CARGO_TARGET_DIR),target)/image/test/sandbox-operator.oci.tar
export SANDBOX_OPERATOR_IMAGE ?= $(abspath $(TEST_IMAGE))
# The test environment (control plane, EC2 endpoint, agents) and the bench are behind the
# non-default `testenv` feature: a plain build ships neither.
TESTENV := --features testenv
# Integration tests start real processes; two at a time suits a 2-core machine.
TEST_THREADS ?= 4

.PHONY: all build image test-image tools crds test test-unit test-integration lint fmt demo bench dist clean-cache help

all: build

help:
	@echo "make demo    run the operator on a local control plane and EC2 endpoint, three agents, examples/"
	@echo "make test    install what the tests need, then run every test"
	@echo "make build   build the shipped binaries (operator, agent, kubectl plugin; no test environment)"
	@echo "make image   the operator's OCI image (target/image/), built here FROM scratch, no registry"
	@echo "make crds    regenerate crds/ from the Rust types"
	@echo "make tools   build kube-apiserver and etcd, create the Python venv (cached)"
	@echo "make lint    rustfmt --check and clippy"
	@echo "make bench   the fleet benchmark (release build; BENCH_ARGS=--quick for a smoke run)"
	@echo "make dist    target/dist/sandbox-agent-VERSION-linux-ARCH.tar.gz (+ .sha256): the agent for the instances"

build:
	$(CARGO) build --bins

tools:
	hack/install-tools.sh all

# The operator's image: a release build without the test environment, the libraries it links and
# CA certificates, user 65532, FROM scratch, packed as an OCI archive that `ctr images import` and
# `docker load` read (target/image/sandbox-operator-VERSION.oci.tar). No container engine, no
# registry. The root Dockerfile builds the same files with ordinary base images.
image:
	CARGO=$(CARGO) hack/build-image.sh

test-image:
	CARGO=$(CARGO) IMAGE_PROFILE=$(TEST_IMAGE_PROFILE) IMAGE_OUT=$(TEST_IMAGE) hack/build-image.sh

crds:
	$(CARGO) run --quiet --bin sandbox-operator -- crds --dir crds

test: tools test-image
	$(CARGO) test $(TESTENV) --lib --bins
	$(CARGO) test $(TESTENV) --test integration -- --test-threads=$(TEST_THREADS)

test-unit:
	$(CARGO) test $(TESTENV) --lib --bins

test-integration: tools test-image
	$(CARGO) test $(TESTENV) --test integration -- --test-threads=$(TEST_THREADS)

# Both builds linted: the shipped one (no test environment, where `unsafe` is forbidden) and the
# one with the test environment, the bench and the tests.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --bins --lib -- -D warnings
	$(CARGO) clippy --all-targets $(TESTENV) -- -D warnings

fmt:
	$(CARGO) fmt --all

demo:
	hack/demo.sh

# The fleet benchmark (issue 9): release build, then every scenario once; figures beside their
# targets on stdout and in target/bench/results.json. `make bench BENCH_ARGS=--quick`: a smoke run.
bench: tools
	$(CARGO) build --release $(TESTENV) --bins
	"$${CARGO_TARGET_DIR:-target}/release/sandbox-bench" $(BENCH_ARGS)

# The agent for the sandbox instances: release build without the test environment, stripped, with
# its systemd unit, example config and install script, in one tarball with a sha256 file.
dist:
	CARGO=$(CARGO) hack/dist.sh

clean-cache:
	rm -rf "$(CACHE)"
