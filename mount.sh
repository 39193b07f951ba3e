#!/usr/bin/env bash
# asyncfs set-up and entry point.
#   ./mount.sh                              set up, build the demo image, mount it on ./mnt
#   ./mount.sh --test [PYTEST ARGS...]      set up, run the whole test suite
#   ./mount.sh IMAGE MOUNTPOINT [-o OPT[,OPT...]] [-f] [-d]   set up, mount IMAGE
#   ./mount.sh --setup                      set up only
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
HERE=$PWD

# Debian packages: FUSE (runtime, headers for pyfuse3's build), liburing-dev for the io_uring
# extension asyncfs builds at install time, the image tools the tests and the demo use, fio for
# workloads, fuse2fs as the benchmark peer, attr/acl for xattr checks, qemu-user and binutils
# for the portability guards (a CPU without AVX-512; no instruction beyond the baseline).
PKGS=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv liburing-dev e2fsprogs fio
      fuse2fs attr acl fdisk util-linux psmisc kmod procps qemu-user binutils qemu-utils nbdkit
      nginx openssl curl httpfs2)

say() { printf '%s\n' "$*" >&2; }

install_packages() {
  local missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    say "asyncfs needs these Debian packages, which are missing: ${missing[*]}"
    say "install them as root, then run this again:  sudo apt-get install ${missing[*]}"
    exit 1
  fi
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pick_python() {
  local c
  for c in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 &&
       "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  say "asyncfs needs Python 3.11 or newer with the venv module"; exit 1
}

setup_venv() {
  local stamp=.venv/.asyncfs-stamp want
  # The io_uring binding is compiled at install: its source and build script are in the stamp.
  want=$(cat pyproject.toml setup.py asyncfs/io/_uring.c | sha256sum | cut -d' ' -f1)
  if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  local py; py=$(pick_python)
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  say "installing asyncfs and its Python dependencies into .venv ..."
  if ! { .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'; \
       } > .venv/setup.log 2>&1; then
    tail -n 30 .venv/setup.log >&2
    say "asyncfs: installing the Python dependencies failed (full log: .venv/setup.log)"
    exit 1
  fi
  if ! .venv/bin/python -c 'import asyncfs.io._uring' 2>/dev/null; then
    say "asyncfs: the io_uring binding was not built (see .venv/setup.log); mounts will be served"
    say "  by the threads backend. It needs gcc, python3-dev and liburing-dev."
  fi
  echo "$want" > "$stamp"
}

ensure_fuse() {
  if [ ! -e /dev/fuse ] && [ "$(id -u)" -eq 0 ]; then
    modprobe fuse 2>/dev/null || true
  fi
}

# mount(8) runs /sbin/mount.fuse.asyncfs for `mount -t fuse.asyncfs` and fstab lines of that
# type. A link already there is replaced only if it points into an asyncfs .venv.
install_mount_helper() {
  local link=/sbin/mount.fuse.asyncfs
  [ "$(id -u)" -eq 0 ] || return 0
  if [ -L "$link" ]; then
    case "$(readlink "$link")" in */.venv/bin/mount.fuse.asyncfs) ;; *) return 0 ;; esac
  elif [ -e "$link" ]; then
    return 0
  fi
  ln -sfn "$HERE/.venv/bin/mount.fuse.asyncfs" "$link"
}

install_packages
setup_venv
install_mount_helper
ensure_fuse

case "${1:-}" in
  --setup)
    exit 0 ;;
  --test)
    shift
    exec .venv/bin/python -m pytest "$@" ;;
  "")
    mkdir -p build mnt
    if [ ! -f build/demo.img ]; then
      say "building the demo image build/demo.img ..."
      .venv/bin/python -m asyncfs.cli.demo build/demo.img >/dev/null
    fi
    if grep -q " $HERE/mnt fuse.asyncfs " /proc/self/mounts; then
      say "the demo image is already mounted on ./mnt"
    else
      .venv/bin/asyncfs mount build/demo.img mnt
    fi
    cat >&2 <<MSG
demo image mounted read-only on ./mnt. Try:
  ls -la mnt; cat mnt/README.txt; getfattr -d mnt/README.txt
  dd if=mnt/big/fio.dat of=/dev/null bs=1M
  fio --name=rand --filename=mnt/big/fio.dat --rw=randread --bs=4k --direct=1 --numjobs=8 --runtime=5 --time_based --group_reporting
  .venv/bin/asyncfs stats mnt
unmount with:  fusermount3 -u mnt
MSG
    ;;
  *)
    exec .venv/bin/asyncfs mount "$@" ;;
esac
