#!/usr/bin/env bash
# Proves the harness itself against the reference back end, qemu-storage-daemon 7.2: if this fails,
# the harness (or the machine) is broken, not the back end under test.
#
#   Tests/vhost/qsd-check.sh
#
# Runs guest-check.sh (see there for the checks) with qemu-storage-daemon's template from
# common.sh: main loop and IOThread, 1 and 2 queues, pattern/cache/discard, verify, write, and
# readloop across block-export-del. The delete runs only for the main-loop export: with an
# IOThread, 7.2 deadlocks (Tests/vhost/README.md), which the Swift back end must not.
# Closes with "guest-check: N passed, M failed"; exit status 0 only when nothing failed.
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec "$VHOST_DIR/guest-check.sh" --name qemu-storage-daemon --del-iothread off -- "${QSD_TEMPLATE[@]}"
