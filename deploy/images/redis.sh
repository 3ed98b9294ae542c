#!/usr/bin/env bash
# Builds a Redis image from Debian's redis-server and redis-cli (package redis-server / redis-tools), the
# shared libraries they load (as ldd lists them) and the static busybox (a shell, nc, sleep for health
# checks and debugging), and imports it as redis:latest (or NAME). The same image serves as the client
# image: it holds redis-cli.
#
#   deploy/images/redis.sh [--data-dir DIR] [NAME]
#   deploy/images/redis.sh --rootfs DIR        only build the root file system into DIR (which must be empty)
#
# The image's Cmd: redis-server --protected-mode no --save "" --appendonly no (no password, no persistence:
# a test and benchmark image). The data dir defaults to $FLOTILLA_DATA_DIR, then /var/lib/flotilla. Uses
# `flotilla` from PATH, else `node dist/cli/main.js` of this repository (run `npm run build` first).
set -euo pipefail

name="redis:latest"
data_dir_args=()
rootfs_only=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data-dir) data_dir_args=(--data-dir "$2"); shift 2 ;;
    --data-dir=*) data_dir_args=(--data-dir "${1#--data-dir=}"); shift ;;
    --rootfs) rootfs_only="$2"; shift 2 ;;
    --rootfs=*) rootfs_only="${1#--rootfs=}"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "redis.sh: unknown option $1" >&2; exit 2 ;;
    *) name="$1"; shift ;;
  esac
done

busybox="${FLOTILLA_BUSYBOX:-/bin/busybox}"
server="${FLOTILLA_REDIS_SERVER:-/usr/bin/redis-server}"
cli="${FLOTILLA_REDIS_CLI:-/usr/bin/redis-cli}"
for f in "$busybox:busybox-static" "$server:redis-server" "$cli:redis-tools"; do
  if [[ ! -x "${f%%:*}" ]]; then
    echo "redis.sh: ${f%%:*} not found (apt-get install ${f#*:})" >&2
    exit 1
  fi
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if [[ -n "$rootfs_only" ]]; then
  root="$rootfs_only"
  mkdir -p "$root"
  if [[ -n "$(ls -A "$root")" ]]; then
    echo "redis.sh: --rootfs $root is not empty" >&2
    exit 2
  fi
else
  root="$(mktemp -d -t flotilla-redis.XXXXXX)"
  trap 'rm -rf "$root"' EXIT
fi
chmod 0755 "$root"

# busybox: the same layout as deploy/images/busybox.sh
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,proc,sys,dev,run,var,home,tmp,data}
chmod 0700 "$root/root"
chmod 1777 "$root/tmp"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [[ "$applet" == busybox || "$applet" == */* ]] && continue
  ln -sf busybox "$root/bin/$applet"
done
ln -sf /bin/busybox "$root/usr/bin/env"

# redis: the binaries (redis-server is a link to redis-check-rdb in Debian, which picks its role from its
# name: copy the file under the server's name) and every library the dynamic loader resolves for them
install -m 0755 "$(readlink -f "$server")" "$root/usr/bin/redis-server"
install -m 0755 "$(readlink -f "$cli")" "$root/usr/bin/redis-cli"
libs="$(ldd "$server" "$cli" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u)"
if [[ -z "$libs" ]]; then
  echo "redis.sh: ldd listed no libraries for $server" >&2
  exit 1
fi
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

printf 'root:x:0:0:root:/root:/bin/sh\nredis:x:999:999:redis:/data:/bin/false\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nredis:x:999:\nnogroup:x:65534:\n' > "$root/etc/group"
# glibc's files and dns lookups are built into libc.so.6 (2.34 and later): no NSS module to copy
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
: > "$root/etc/hosts"; : > "$root/etc/hostname"; : > "$root/etc/resolv.conf"
chmod 0644 "$root"/etc/{passwd,group,nsswitch.conf,hosts,hostname,resolv.conf}

# the image must run: the server and client start in the tree with nothing from the host
if [[ "$(chroot "$root" /usr/bin/redis-server --version 2>&1)" != Redis\ server* ]] || ! chroot "$root" /usr/bin/redis-cli --version >/dev/null 2>&1; then
  echo "redis.sh: redis-server or redis-cli does not start in the built tree:" >&2
  chroot "$root" /usr/bin/redis-server --version >&2 || true
  exit 1
fi

[[ -n "$rootfs_only" ]] && exit 0

if command -v flotilla >/dev/null 2>&1; then
  flotilla=(flotilla)
else
  flotilla=(node "$repo/dist/cli/main.js")
fi
# reproducible: built on each node from the same packages, it has the same digest everywhere
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(stat -c %Y /usr/bin/redis-server)}"
"${flotilla[@]}" image import "${data_dir_args[@]}" --workdir /data \
  --cmd '["redis-server","--protected-mode","no","--save","","--appendonly","no"]' "$name" "$root"
