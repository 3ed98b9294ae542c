#!/usr/bin/env bash
# Builds a busybox test image from Debian's busybox-static and imports it as busybox:latest (or NAME).
#
#   deploy/images/busybox.sh [--data-dir DIR] [NAME]
#
# The data dir defaults to $FLOTILLA_DATA_DIR, then /var/lib/flotilla. Uses `flotilla` from PATH, else
# `node dist/cli/main.js` of this repository (run `npm run build` first).
set -euo pipefail

name="busybox:latest"
data_dir_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data-dir) data_dir_args=(--data-dir "$2"); shift 2 ;;
    --data-dir=*) data_dir_args=(--data-dir "${1#--data-dir=}"); shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) name="$1"; shift ;;
  esac
done

busybox="${FLOTILLA_BUSYBOX:-/bin/busybox}"
if [[ ! -x "$busybox" ]]; then
  echo "busybox.sh: $busybox not found (apt-get install busybox-static)" >&2
  exit 1
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if command -v flotilla >/dev/null 2>&1; then
  flotilla=(flotilla)
else
  flotilla=(node "$repo/dist/cli/main.js")
fi

root="$(mktemp -d -t flotilla-busybox.XXXXXX)"
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,proc,sys,dev,run,var,home,tmp}
chmod 0700 "$root/root"
chmod 1777 "$root/tmp"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [[ "$applet" == busybox || "$applet" == */* ]] && continue
  ln -sf busybox "$root/bin/$applet"
done
ln -sf /bin/busybox "$root/usr/bin/env"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
: > "$root/etc/hosts"; : > "$root/etc/hostname"; : > "$root/etc/resolv.conf"
chmod 0644 "$root"/etc/{passwd,group,hosts,hostname,resolv.conf}

# reproducible: built on each node from the same packages, it has the same digest everywhere
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(stat -c %Y /bin/busybox)}"
"${flotilla[@]}" image import "${data_dir_args[@]}" --cmd sh "$name" "$root"
