#!/usr/bin/env bash
# A multi-host test bed on this machine, to try flotilla by hand (root; see docs/testbed.md):
#
#   bash deploy/testbed.sh up [HOSTS] [--managers N] [--no-busybox]   # default 3 hosts, 1 manager
#   bash deploy/testbed.sh ls                                         # run ids of the beds here
#   bash deploy/testbed.sh down [RUNID...]       # default: manual beds and those of dead tests
#
# Each host is a network namespace (fl-<runid>-hN) on an underlay bridge that lives in its own
# namespace (fl-<runid>-ul), running its own `flotilla manager` or `flotilla agent` (real runc).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "testbed.sh: needs root (network namespaces, runc)" >&2
  exit 1
fi
for bin in ip nsenter runc conmon; do
  command -v "$bin" >/dev/null || { echo "testbed.sh: $bin not found in PATH" >&2; exit 1; }
done
if [ ! -f dist/test/helpers/testbed-cli.js ] || [ ! -f dist/cli/main.js ]; then
  echo "testbed.sh: building (npx tsc -p tsconfig.json)" >&2
  npx tsc -p tsconfig.json
fi
exec node dist/test/helpers/testbed-cli.js "$@"
