#!/usr/bin/env bash
# `make image`: the operator's OCI image, built here with no container engine and nothing pulled
# from any registry. A release build of `sandbox-operator` (without the test environment), laid
# out FROM scratch by hack/image-rootfs.sh (the binary, the libraries it links, CA certificates,
# user 65532), packed by hack/oci-image.py into an OCI archive that `ctr images import` and
# `docker load` both read. The root Dockerfile builds the same files with ordinary base images.
#
#   IMAGE_NAME (sandbox-operator)  IMAGE_TAG (the crate's version)  IMAGE_PROFILE (release)
#   IMAGE_OUT (target/image/$IMAGE_NAME-$IMAGE_TAG.oci.tar)
set -euo pipefail
cd "$(dirname "$0")/.."
name=${IMAGE_NAME:-sandbox-operator}
tag=${IMAGE_TAG:-$(awk -F'"' '/^version *=/{print $2; exit}' Cargo.toml)}
profile=${IMAGE_PROFILE:-release}
target=${CARGO_TARGET_DIR:-target}
out=${IMAGE_OUT:-$target/image/$name-$tag.oci.tar}
start=$SECONDS

${CARGO:-cargo} build --profile "$profile" --no-default-features --bin sandbox-operator
case $profile in dev) bindir=debug ;; *) bindir=$profile ;; esac
rootfs=$target/image/rootfs
hack/image-rootfs.sh "$rootfs" "$target/$bindir/sandbox-operator"
mkdir -p "$(dirname "$out")"
python3 hack/oci-image.py "$rootfs" "$out" --name "$name" --tag "$tag" --user 65532:65532 \
  --owned var/lib/sandbox-operator \
  --entrypoint /usr/local/bin/sandbox-operator --cmd run \
  --env PATH=/usr/local/bin --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --env HOME=/var/lib/sandbox-operator \
  --label "org.opencontainers.image.title=sandbox-operator" \
  --label "org.opencontainers.image.version=$tag"
echo "image: $out ($(du -h "$out" | cut -f1)) in $((SECONDS - start)) s" >&2
echo "load it: ctr -n k8s.io images import $out   or   docker load -i $out" >&2
