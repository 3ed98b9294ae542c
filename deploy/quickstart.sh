#!/usr/bin/env bash
# One-node cluster on this machine: install, build, import the busybox test image, start a manager
# (with its in-process agent, real runc), run a replicated service publishing port 8080 and show it answering.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
DATA=${FLOTILLA_DATA_DIR:-/var/lib/flotilla}
SOCK=/run/flotilla/control.sock
bash deploy/images/busybox.sh --data-dir "$DATA"
if ! flotilla cluster info >/dev/null 2>&1; then
  mkdir -p /var/log
  nohup flotilla manager --data-dir "$DATA" --listen-addr 127.0.0.1:4242 --control-socket "$SOCK" \
    >>/var/log/flotilla-manager.log 2>&1 &
  echo "started flotilla manager (pid $!, log /var/log/flotilla-manager.log)"
  for _ in $(seq 1 100); do [ -S "$SOCK" ] && flotilla cluster info >/dev/null 2>&1 && break; sleep 0.1; done
  # e.g. a data dir from a flotilla without mutual TLS is refused with one line saying what to do
  flotilla cluster info >/dev/null 2>&1 || { echo "the manager did not start:" >&2; tail -n 3 /var/log/flotilla-manager.log >&2; exit 1; }
fi
# the CLI here uses the unix socket; for remote use over TCP: flotilla cluster client-cert --out DIR
flotilla node ls
flotilla service rm web >/dev/null 2>&1 || true
sleep 0.5
# three web servers (busybox httpd serving their hostname), published on port 8080 of every node
flotilla service create --name web --replicas 3 -p 8080:80 busybox:latest \
  sh -c 'mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www'
flotilla service ps web
flotilla service ls
# the routing mesh answers on the node's addresses, localhost included, and spreads connections over the tasks
for i in 1 2 3 4 5 6; do
  for _ in $(seq 1 50); do out=$(busybox wget -qO- http://127.0.0.1:8080/ 2>/dev/null) && break; sleep 0.2; done
  echo "http://127.0.0.1:8080/ -> ${out:-no answer}"
done
echo
echo "Try: flotilla service scale web=5 && flotilla service ps web"
