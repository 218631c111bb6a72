#!/usr/bin/env bash
# Builds a real MXNet 1.9.1 image without a container registry:
#   debootstrap of Debian bookworm (python3, libgomp1, libquadmath0, libgfortran5),
#   MXNet 1.9.1 and numpy<1.24 wheels downloaded with this machine's pip and installed
#   offline into the root file system, geomx's example training script at
#   /opt/geomx/examples/mxnet_ps_train.py and its data set (scikit-learn's handwritten digits,
#   taken from the scikit-learn wheel) at /opt/geomx/data/digits.csv.gz, then `docker import`.
#
# Usage: scripts/build-mxnet-image.sh [--tar FILE] [--tag TAG] [--import DOCKER_HOST]...
#   --tar FILE      where the root file system tarball goes; reused when it exists and was
#                   built from this script and the same training script (FILE.key holds
#                   their hash) (default /var/cache/geomx/mxnet-1.9.1.tar)
#   --tag TAG       image tag (default geomx/mxnet:1.9.1)
#   --import HOST   import into the dockerd at HOST (e.g. unix:///var/run/docker.sock);
#                   repeatable; without it the tarball is only built
# Needs root (debootstrap, chroot) and network access to a Debian mirror and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

tar_file=/var/cache/geomx/mxnet-1.9.1.tar
tag=geomx/mxnet:1.9.1
imports=()
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
while [ $# -gt 0 ]; do
  case "$1" in
    --tar) tar_file=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --import) imports+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build-mxnet-image: unknown argument $1" >&2; exit 2 ;;
  esac
done

script=examples/mxnet/mxnet_ps_train.py
# the cache is keyed by what goes into the image (this script and the training script), not
# by file times: a fresh clone's files are all newer than any cache
key=$(cat "$0" "$script" | sha256sum | cut -d' ' -f1)
if [ -s "$tar_file" ] && [ "$(cat "$tar_file.key" 2>/dev/null)" = "$key" ]; then
  echo "build-mxnet-image: reusing $tar_file (key ${key:0:12})"
else
  command -v debootstrap >/dev/null || { echo "build-mxnet-image: debootstrap missing (scripts/install-deps.sh)" >&2; exit 1; }
  work=$(mktemp -d /var/tmp/geomx-mxnet.XXXXXX)
  trap 'umount -l "$work/rootfs/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
  echo "build-mxnet-image: debootstrap bookworm into $work/rootfs"
  debootstrap --variant=minbase \
    --include=python3,python3-pip,libgomp1,libquadmath0,libgfortran5,ca-certificates \
    bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

  echo "build-mxnet-image: downloading wheels with $(python3 -m pip --version | cut -d' ' -f1-2)"
  mkdir -p "$work/rootfs/tmp/wheels"
  python3 -m pip download --quiet --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --implementation cp \
    "mxnet==1.9.1" "numpy<1.24" -d "$work/rootfs/tmp/wheels"

  echo "build-mxnet-image: installing wheels offline"
  env -u PIP_FIND_LINKS -u PIP_CERT -u PIP_INDEX_URL chroot "$work/rootfs" python3 -m pip install --quiet --no-index --no-cache-dir \
    --break-system-packages --find-links /tmp/wheels "mxnet==1.9.1" "numpy<1.24"
  rm -rf "$work/rootfs/tmp/wheels"
  mount -t proc proc "$work/rootfs/proc"
  chroot "$work/rootfs" python3 -c 'import mxnet, numpy; assert mxnet.__version__ == "1.9.1"; print("mxnet", mxnet.__version__, "numpy", numpy.__version__)'
  umount -l "$work/rootfs/proc"

  install -D -m 0755 "$script" "$work/rootfs/opt/geomx/examples/mxnet_ps_train.py"
  # the training data: scikit-learn's handwritten digits, the CSV its wheel ships (only the
  # file is taken; scikit-learn itself is not installed)
  echo "build-mxnet-image: taking the digits data set from the scikit-learn wheel"
  mkdir -p "$work/sklearn"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --implementation cp "scikit-learn==1.3.2" -d "$work/sklearn"
  mkdir -p "$work/rootfs/opt/geomx/data"
  python3 - "$work/sklearn" "$work/rootfs/opt/geomx/data/digits.csv.gz" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/scikit_learn-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("sklearn/datasets/data/digits.csv.gz"))
PY
  ln -sf python3 "$work/rootfs/usr/bin/python"
  chroot "$work/rootfs" apt-get clean
  rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/debconf/"*-old

  mkdir -p "$(dirname "$tar_file")"
  tar -C "$work/rootfs" --numeric-owner -cf "$tar_file.tmp" .
  mv "$tar_file.tmp" "$tar_file"
  echo "$key" > "$tar_file.key"
  echo "build-mxnet-image: wrote $tar_file ($(du -h "$tar_file" | cut -f1))"
fi

for host in "${imports[@]}"; do
  docker -H "$host" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'WORKDIR /opt/geomx' \
    --change 'CMD ["python3"]' \
    "$tar_file" "$tag" >/dev/null
  echo "build-mxnet-image: imported $tag into $host"
done
