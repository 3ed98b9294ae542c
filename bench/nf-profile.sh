#!/bin/bash
# Where one iperf3 flow's kernel CPU goes, netfilter apart: runs a 6 s iperf3 from CLIENT_NETNS to IP (server in
# SERVER_NETNS), records `perf record -a -g` for 4 s of it, and prints the MB/s in that window, the perf samples
# of iperf3 + ksoftirqd per GB, and the share of those samples in netfilter (nft_*, nf_*, br_nf_*, conntrack,
# NAT; "nft" = the nftables rule evaluation alone, "ct" = conntrack). Shares are relative to the flow's own
# samples, so they stay comparable when other work shares the cores (the rate does not).
#   bash bench/nf-profile.sh NAME SERVER_NETNS CLIENT_NETNS IP     (root, iperf3, perf; netns as paths)
# Used for docs/benchmarks.md, "bench:network: what our overlay costs more than the hand-built one".
set -euo pipefail
NAME=$1; SRV=$2; CLI=$3; IP=$4
OUT=$(mktemp -d /tmp/nf-profile-XXXXXX)
trap 'rm -rf "$OUT"' EXIT
nsenter --net="$SRV" timeout 30 iperf3 -s -1 -p 7303 >/dev/null 2>&1 & sp=$!
sleep 0.3
nsenter --net="$CLI" timeout 30 iperf3 -c "$IP" -p 7303 -t 6 -i 1 -J >"$OUT/iperf.json" & cp=$!
sleep 1.2
perf record -F 1000 -a -g -o "$OUT/perf.data" sleep 4 >/dev/null 2>&1
wait "$cp" "$sp"
C=iperf3,ksoftirqd/0,ksoftirqd/1
perf report -i "$OUT/perf.data" --no-children --comms $C --percentage relative --sort sym --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' >"$OUT/rel" || true
n=$(perf report -i "$OUT/perf.data" --no-children --comms $C --stdio -n --sort comm -g none 2>/dev/null | awk '/^ +[0-9]/{s+=$2} END{print s+0}')
python3 - "$NAME" "$n" "$OUT" <<'PY'
import json, re, sys
name, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
iv = json.load(open(out + '/iperf.json'))['intervals']
b = sum(i['sum']['bytes'] for i in iv[1:5])  # seconds 2-5, about the perf window
rel = {}
for l in open(out + '/rel'):
    m = re.match(r'\s+([0-9.]+)%\s+\[.\]\s+(.*\S)', l)
    if m: rel[m.group(2)] = float(m.group(1))
nf = sum(v for k, v in rel.items() if re.match(r'(nft_|nf_|br_nf|__nf|ip_sabotage|setup_pre_routing|nf_bridge|sized_strscpy|strnlen)', k))
nft = sum(v for k, v in rel.items() if re.match(r'(nft_|sized_strscpy|strnlen)', k))
ct = sum(v for k, v in rel.items() if 'conntrack' in k or k.startswith(('nf_ct', '__nf_ct')))
print(f"{name:10s} {b/4e6:6.0f} MB/s  {n/(b/1e9):6.0f} samples/GB  netfilter {nf:4.1f}%  nft {nft:4.1f}%  conntrack {ct:4.1f}%  load {open('/proc/loadavg').read().split()[0]}")
PY
