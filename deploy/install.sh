#!/usr/bin/env bash
# Installs what flotilla needs on a fresh Debian 12 machine (as root), then builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then echo "install.sh: run as root (runc, mounts and cgroups need it)" >&2; exit 1; fi
apt-get update
apt-get install -y runc conmon busybox-static iproute2 jq ca-certificates
if ! command -v node >/dev/null || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  apt-get install -y nodejs npm
  if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    echo "install.sh: flotilla needs Node.js 20 or newer; this machine has $(node --version)" >&2
    exit 1
  fi
fi
npm ci
npm run build
