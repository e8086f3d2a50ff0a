#!/usr/bin/env bash
# Lays out the operator image's root filesystem in DIR from a built `sandbox-operator` binary:
# the binary at /usr/local/bin, the shared libraries it links (as `ldd` names them, copied from
# this Debian system), the system's CA certificates (for AWS and Fly.io), /etc/passwd and
# /etc/group naming the non-root user 65532, and the two writable mount points the chart uses
# (/tmp and /var/lib/sandbox-operator). Nothing else: no shell, no package manager. The binary
# is stripped of debug info (`strip`, binutils).
#
# Both `make image` (hack/build-image.sh, no container engine) and the root Dockerfile (in its
# builder stage) call this script, so both build the same files.
#
# usage: hack/image-rootfs.sh DIR BINARY
set -euo pipefail
dir=$1 bin=$2
[ -x "$bin" ] || { echo "image-rootfs: $bin is not an executable" >&2; exit 1; }
rm -rf "$dir"
mkdir -p "$dir"/{usr/local/bin,etc/ssl/certs,tmp,var/lib/sandbox-operator}
install -m 0755 "$bin" "$dir/usr/local/bin/sandbox-operator"
# The debug line tables the release profile keeps are for local backtraces; the image drops them
# (its panics still name functions: the symbol table stays).
strip --strip-debug "$dir/usr/local/bin/sandbox-operator"

# The dynamic loader and every library, at the paths the binary asks for (dereferenced: the image
# has no /lib -> /usr/lib link to resolve them through).
ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\/[^ ]+ \(/{print $1}' | sort -u | while read -r lib; do
  mkdir -p "$dir$(dirname "$lib")"
  cp -L "$lib" "$dir$lib"
  chmod 0755 "$dir$lib"
done

ca=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca" ] || { echo "image-rootfs: $ca is missing (apt-get install ca-certificates)" >&2; exit 1; }
install -m 0644 "$ca" "$dir/etc/ssl/certs/ca-certificates.crt"

printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/var/lib/sandbox-operator:/sbin/nologin\n' >"$dir/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
chmod 0644 "$dir/etc/passwd" "$dir/etc/group"
chmod 1777 "$dir/tmp"
chmod 0755 "$dir/var/lib/sandbox-operator"
