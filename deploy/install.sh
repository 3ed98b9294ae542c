#!/usr/bin/env bash
# Installs what flotilla needs on a fresh Debian 12 machine (as root), builds it and puts `flotilla`
# on the PATH (/usr/local/bin/flotilla -> dist/cli/main.js of this checkout).
#   --systemd   also install the units of deploy/systemd into /etc/systemd/system (not enabled)
# FLOTILLA_SKIP_NPM_CI=1 keeps an existing node_modules (a development tree sharing one).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then echo "install.sh: run as root (runc, mounts and cgroups need it)" >&2; exit 1; fi
systemd=0
for arg in "$@"; do
  case "$arg" in
    --systemd) systemd=1 ;;
    *) echo "install.sh: unknown option $arg (use --systemd)" >&2; exit 2 ;;
  esac
done
apt-get update
apt-get install -y runc conmon busybox-static tini iproute2 jq ca-certificates util-linux procps attr python3 containernetworking-plugins nftables conntrack systemd docker-registry skopeo openssl socat redis-server redis-tools etcd-server
if ! command -v node >/dev/null || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  apt-get install -y nodejs npm
  if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    echo "install.sh: flotilla needs Node.js 20 or newer; this machine has $(node --version)" >&2
    exit 1
  fi
fi
if [ -z "${FLOTILLA_SKIP_NPM_CI:-}" ] || [ ! -d node_modules ]; then npm ci; fi
npm run build
ln -sfn "$PWD/dist/cli/main.js" /usr/local/bin/flotilla
echo "install.sh: /usr/local/bin/flotilla -> $PWD/dist/cli/main.js"
if [ "$systemd" = 1 ]; then
  install -d -m 0700 /etc/flotilla /var/lib/flotilla
  install -m 0644 deploy/systemd/flotilla-manager.service deploy/systemd/flotilla-agent.service /etc/systemd/system/
  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
  echo "install.sh: units installed: systemctl enable --now flotilla-manager (or flotilla-agent; see the README)"
fi
