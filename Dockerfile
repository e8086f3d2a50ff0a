# The operator's image for a CI with ordinary base images: `docker build -t sandbox-operator:TAG .`
#
# `make image` builds the same result on a machine with no container engine and no registry: the
# same release build (`--no-default-features`: no test environment), laid out FROM scratch by the
# same script (hack/image-rootfs.sh: the binary at /usr/local/bin, the libraries it links, CA
# certificates, /etc/passwd naming user 65532, /tmp and /var/lib/sandbox-operator), with the same
# user, entrypoint and environment, packed by hack/oci-image.py into an OCI archive.
#
# The result runs as 65532:65532 with a read-only root filesystem (the chart mounts emptyDirs at
# /tmp and /var/lib/sandbox-operator). It has no shell.

# A Rust toolchain on Debian bookworm: the libraries copied into the image are bookworm's.
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --no-default-features --bin sandbox-operator \
 && hack/image-rootfs.sh /rootfs target/release/sandbox-operator

FROM scratch
COPY --from=build /rootfs/ /
# /var/lib/sandbox-operator belongs to the operator's user (hack/oci-image.py sets the same owner).
COPY --from=build --chown=65532:65532 /rootfs/var/lib/sandbox-operator /var/lib/sandbox-operator
ENV PATH=/usr/local/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    HOME=/var/lib/sandbox-operator
LABEL org.opencontainers.image.title=sandbox-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sandbox-operator"]
CMD ["run"]
