#!/usr/bin/env python3
"""Packs a root filesystem directory into a one-layer OCI image archive, with no container engine.

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) that also carries a
Docker `manifest.json`, so both `ctr images import` and `docker load` read it. The layer is
reproducible: entries sorted, times zero, owners set here (root, except the paths given to
--owned, which belong to the image's user).

usage: oci-image.py ROOTFS OUT.tar --name NAME --tag TAG --user UID:GID [--owned PATH]...
       [--entrypoint PATH] [--cmd ARG]... [--env K=V]... [--label K=V]...
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile


def layer_tar(rootfs, owned, uid, gid):
    """The uncompressed layer: every file under rootfs, sorted, with fixed times and owners."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = []
        for base, dirs, files in os.walk(rootfs):
            dirs.sort()
            for name in dirs + sorted(files):
                paths.append(os.path.join(base, name))
        for path in sorted(paths, key=lambda p: os.path.relpath(p, rootfs)):
            rel = os.path.relpath(path, rootfs)
            info = tar.gettarinfo(path, arcname=rel)
            info.mtime = 0
            info.uname = info.gname = ""
            mine = any(rel == o or rel.startswith(o + "/") for o in owned)
            info.uid, info.gid = (uid, gid) if mine else (0, 0)
            info.mode = stat.S_IMODE(os.lstat(path).st_mode)
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def blob(out, data):
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    info.mode = 0o644
    out.addfile(info, io.BytesIO(data))
    return digest


def add_file(out, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    out.addfile(info, io.BytesIO(data))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("rootfs")
    p.add_argument("out")
    p.add_argument("--name", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--owned", action="append", default=[])
    p.add_argument("--entrypoint")
    p.add_argument("--cmd", action="append", default=[])
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--label", action="append", default=[])
    a = p.parse_args()
    uid, gid = (int(x) for x in a.user.split(":"))
    owned = [o.strip("/") for o in a.owned]

    raw = layer_tar(a.rootfs, owned, uid, gid)
    diff_id = hashlib.sha256(raw).hexdigest()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=9) as z:
        z.write(raw)
    layer = gz.getvalue()

    labels = dict(kv.split("=", 1) for kv in a.label)
    config = {
        # Fixed, like every time in the layer: the same inputs give the same image id.
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": a.user,
            "Env": a.env,
            "Entrypoint": [a.entrypoint] if a.entrypoint else None,
            "Cmd": a.cmd or None,
            "WorkingDir": "/",
            "Labels": labels or None,
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created_by": "hack/image-rootfs.sh + hack/oci-image.py"}],
    }
    config["config"] = {k: v for k, v in config["config"].items() if v is not None}
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()

    ref = f"{a.name}:{a.tag}"
    # The name containerd and the kubelet resolve a short name to.
    first = a.name.split("/")[0]
    if "/" not in a.name:
        full = f"docker.io/library/{ref}"
    elif "." in first or ":" in first or first == "localhost":
        full = ref
    else:
        full = f"docker.io/{ref}"

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as out:
        add_file(out, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        layer_digest = blob(out, layer)
        config_digest = blob(out, config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{config_digest}",
                "size": len(config_bytes),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": f"sha256:{layer_digest}",
                    "size": len(layer),
                }
            ],
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        manifest_digest = blob(out, manifest_bytes)
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": f"sha256:{manifest_digest}",
                    "size": len(manifest_bytes),
                    "annotations": {
                        "io.containerd.image.name": full,
                        "org.opencontainers.image.ref.name": a.tag,
                    },
                }
            ],
        }
        add_file(out, "index.json", json.dumps(index, sort_keys=True).encode())
        docker = [
            {
                "Config": f"blobs/sha256/{config_digest}",
                "RepoTags": [ref],
                "Layers": [f"blobs/sha256/{layer_digest}"],
            }
        ]
        add_file(out, "manifest.json", json.dumps(docker).encode())
    os.replace(tmp, a.out)
    print(
        json.dumps(
            {
                "image": full,
                "archive": a.out,
                "manifest": f"sha256:{manifest_digest}",
                "config": f"sha256:{config_digest}",
                "layer_bytes_compressed": len(layer),
                "layer_bytes": len(raw),
            }
        )
    )


if __name__ == "__main__":
    main()
