#!/usr/bin/env bash
# Mount the bundled two-layer sample image with a writable layer on top, and watch copy-up,
# whiteouts and the untouched lower layers. Needs root (FUSE) and fuse3.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v fusermount3 >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
fi
# The binary's path as cargo reports it (.cargo/config.toml names the target: target/<host>/release).
bin=$(cargo build --release -q --message-format=json | sed -n 's/.*"executable":"\([^"]*\/layerfs\)".*/\1/p')
[ -x "$bin" ] || { echo "demo: cargo build reported no layerfs binary" >&2; exit 1; }
work=$(mktemp -d /tmp/layerfs-demo.XXXXXX)
cp -a examples/sample "$work/layers"
mkdir -p "$work/upper" "$work/work" "$work/rootfs"
cleanup() {
  [ -n "${events_pid:-}" ] && kill "$events_pid" 2>/dev/null || true
  "$bin" umount "$work/rootfs" 2>/dev/null || true
}
trap cleanup EXIT
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

say layerfs mount -o lowerdir=app:base,upperdir=upper,workdir=work rootfs
"$bin" mount -o "lowerdir=$work/layers/app:$work/layers/base,upperdir=$work/upper,workdir=$work/work" "$work/rootfs"
cd "$work"
say 'find rootfs -type f   # the union: app wins, /etc/motd is whited out by app/etc/.wh.motd'
find rootfs -type f | sort
say 'cat rootfs/app/config'; cat rootfs/app/config
say 'find upper            # the writable layer starts empty'; find upper
say 'layerfs events rootfs &   # live copy-on-write events (lines marked >>)'
"$bin" events rootfs | sed -u 's/^/   >> /' &
events_pid=$!
sleep 0.5
say 'echo "local change" >> rootfs/etc/os-release   # first write: copy-up'
echo "local change" >> rootfs/etc/os-release; sleep 0.3
say 'rm rootfs/var/cache/blob                       # delete a lower file: whiteout'
rm rootfs/var/cache/blob; sleep 0.3
say 'mkdir rootfs/data && echo new > rootfs/data/file'
mkdir rootfs/data && echo new > rootfs/data/file; sleep 0.3
kill "$events_pid" 2>/dev/null || true; events_pid=
say 'layerfs which rootfs/etc/os-release rootfs/var/cache/blob'
"$bin" which rootfs/etc/os-release rootfs/var/cache/blob
say 'layerfs layers rootfs --svg layers.svg   # what each layer adds, changes, deletes'
"$bin" layers rootfs --svg layers.svg
say 'find upper -printf "%M %p\n"   # copied-up file, char 0/0 whiteout, new dir'
find upper -printf '%M %p\n' | sort -k2
say 'cat upper/etc/os-release'; cat upper/etc/os-release
say 'cat layers/base/etc/os-release   # the lower layer is untouched'; cat layers/base/etc/os-release
say 'ls layers/base/var/cache'; ls layers/base/var/cache
say "layerfs umount rootfs"
"$bin" umount rootfs
trap - EXIT
echo
echo "Left in $work (upper/ can be mounted again, or by the kernel: mount -t overlay)."
