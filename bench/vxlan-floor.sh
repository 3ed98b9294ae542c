#!/bin/bash
# The kernel's own overlay path, built by hand without flotilla: the floor for bench:network's overlay.
# Same shape as the test bed: an underlay namespace holding a bridge, two host namespaces on it, and in
# each host a bridge with a VXLAN device (id 4242, UDP 4789) and one "container" namespace on that
# bridge (MTU 1450). iperf3 host->host (underlay) and container->container (overlay), alternating, 3 s
# each; prints one line per round, the median ratio and the median CPU per byte overlay/underlay (iperf3's
# CPU use of both ends, as bench:network counts it). Everything lives in namespaces it makes and deletes
# on exit (198.18.250.0/24 and 10.250.0.0/24 never leave them).
#   bash bench/vxlan-floor.sh [ROUNDS]     (root, iperf3, busybox)
set -euo pipefail
ROUNDS=${1:-5}
P=vxf$$
cleanup() { for n in ul hA hB cA cB; do ip netns del "$P-$n" 2>/dev/null || true; done; }
trap cleanup EXIT
for n in ul hA hB cA cB; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
ip -n "$P-ul" link add br0 type bridge
ip -n "$P-ul" link set br0 up
i=1
for h in A B; do
  ip link add "${P}u$h" type veth peer name "${P}e$h"
  ip link set "${P}u$h" netns "$P-ul"
  ip -n "$P-ul" link set "${P}u$h" master br0 up
  ip link set "${P}e$h" netns "$P-h$h"
  ip -n "$P-h$h" link set "${P}e$h" name eth0
  ip -n "$P-h$h" addr add "198.18.250.$((10 + i))/24" dev eth0
  ip -n "$P-h$h" link set eth0 up
  i=$((i + 1))
done
i=1
for h in A B; do
  peer=198.18.250.12
  [ "$h" = B ] && peer=198.18.250.11
  ip -n "$P-h$h" link add br1 type bridge
  ip -n "$P-h$h" link set br1 up
  ip -n "$P-h$h" link add vx1 type vxlan id 4242 local "198.18.250.$((10 + i))" remote "$peer" dstport 4789 dev eth0
  ip -n "$P-h$h" link set vx1 master br1 up
  ip link add "${P}c$h" type veth peer name "${P}k$h"
  ip link set "${P}k$h" netns "$P-h$h"
  ip -n "$P-h$h" link set "${P}k$h" master br1 up
  ip link set "${P}c$h" netns "$P-c$h"
  ip -n "$P-c$h" link set "${P}c$h" name eth0
  ip -n "$P-c$h" link set eth0 mtu 1450
  ip -n "$P-c$h" addr add "10.250.0.$i/24" dev eth0
  ip -n "$P-c$h" link set eth0 up
  i=$((i + 1))
done
ip netns exec "$P-cA" busybox ping -c1 -W2 10.250.0.2 >/dev/null
tput() { # server-ns client-ns ip -> "MB/s MB-per-CPU-second"
  ip netns exec "$1" timeout 20 iperf3 -s -1 -p 7301 >/dev/null 2>&1 &
  local sp=$!
  sleep 0.3
  # "MB/s MB-per-CPU-second" (CPU: both ends' iperf3 processes, as bench:network counts it)
  ip netns exec "$2" timeout 20 iperf3 -c "$3" -p 7301 -t 3 -J | python3 -c 'import json,sys; e=json.load(sys.stdin)["end"]; m=e["sum_received"]["bits_per_second"]/8e6; c=e["cpu_utilization_percent"]; print(round(m), round(m/((c["host_total"]+c["remote_total"])/100)))'
  wait "$sp" 2>/dev/null || true
}
ratios=()
costs=()
for r in $(seq 1 "$ROUNDS"); do
  read -r u ue < <(tput "$P-hB" "$P-hA" 198.18.250.12)
  read -r o oe < <(tput "$P-cB" "$P-cA" 10.250.0.2)
  q=$(python3 -c "print(round($o/$u, 2))")
  k=$(python3 -c "print(round($ue/$oe, 2))")
  ratios+=("$q")
  costs+=("$k")
  echo "round $r: underlay $u MB/s ($ue MB per CPU-second), overlay $o MB/s ($oe), ratio $q, overlay CPU per byte ${k}x"
done
med() { sort -n | python3 -c 'import sys,statistics; print(round(statistics.median(float(x) for x in sys.stdin), 2))'; }
echo "median ratio $(printf '%s\n' "${ratios[@]}" | med)"
echo "median CPU per byte overlay/underlay $(printf '%s\n' "${costs[@]}" | med)x"
