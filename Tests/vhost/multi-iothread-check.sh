#!/usr/bin/env bash
# A real guest on a 2-queue export spread over 2 IOThreads (QEMU 9.0+'s iothread list, given in
# the CLI spelling iothread.0=iot0,iothread.1=iot1): queue 0 runs on iot0 (with the control
# socket), queue 1 on iot1.
#
#   multi-iothread-check.sh DATAPLANE-BINARY
#
# Starts `DATAPLANE serve` with two --object iothread and that export on a fresh 64 MiB raw
# image, checks over QMP that both IOThreads list exp0 as holder, boots the guest with 2 queues
# (pattern, cache toggle, discard), checks (x-query-iothread-stats) that both IOThreads completed
# I/O, stops the back end with SIGTERM, and checks that the host file holds the guest's pattern. Prints "ok   NAME" / "FAIL NAME" per check and closes with
# "multi-iothread-check: N passed, M failed"; exit status 0 only when nothing failed. Logs stay
# in CACHE/multi-iothread-check.*/ on failure (or always with DP_VHOST_KEEP=1).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[ $# -eq 1 ] || { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2; exit 3; }
DATAPLANE=$1

"$VHOST_DIR/setup.sh" > /dev/null || exit 2
. "$VHOST_CACHE/env.sh"

WORK=$(mktemp -d "$VHOST_CACHE/multi-iothread-check.XXXXXX")
IMG=$WORK/disk.raw SOCK=$WORK/vhost.sock QMP=$WORK/qmp.sock
passed=0 failed=0 BACKEND_PID=
check() { # NAME CONDITION-RC [DETAIL]
    if [ "$2" = 0 ]; then passed=$((passed + 1)); echo "ok   $1"
    else failed=$((failed + 1)); echo "FAIL $1 ${3:-}"; fi
}
cleanup() { [ -n "$BACKEND_PID" ] && stop_pid "$BACKEND_PID" 5; }
trap cleanup EXIT

name=2iothreads-q2-pattern
qemu-img create -q -f raw "$IMG" 64M
if start_backend "$WORK/backend.log" "$SOCK" 15 "$DATAPLANE" serve \
        --object iothread,id=iot0 --object iothread,id=iot1 \
        --blockdev "driver=file,node-name=file0,filename=$IMG" \
        --blockdev driver=raw,node-name=disk0,file=file0 \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=2,iothread.0=iot0,iothread.1=iot1" \
        --chardev "socket,id=qmp0,path=$QMP,server=on,wait=off" --monitor chardev=qmp0; then
    python3 "$VHOST_DIR/qmp.py" --timeout 5 "$QMP" query-iothreads > "$WORK/iothreads.qmp"
    holders=$(grep -o '"holders":\["exp0"\]' "$WORK/iothreads.qmp" | wc -l)
    check "$name: both IOThreads hold exp0" $([ "$holders" = 2 ]; echo $?) "($(cat "$WORK/iothreads.qmp"))"
    "$VHOST_DIR/run-guest.sh" "$SOCK" pattern,cache,discard --queues 2 --dp seed=2 --log "$WORK/$name.log" --quiet
    rc=$?
    check "$name: guest pattern,cache,discard" $rc "(see $WORK/$name.log)"
    # The guest's 2 vCPUs submit on both hardware queues (blk-mq maps CPU k to queue k), so
    # each IOThread must have completed some of the file I/O.
    python3 "$VHOST_DIR/qmp.py" --timeout 5 "$QMP" x-query-iothread-stats > "$WORK/stats.qmp"
    python3 - "$WORK/stats.qmp" <<'PY'
import json, sys
stats = [json.loads(l)["return"] for l in open(sys.argv[1]) if l.startswith('{"return":[')][0]
done = {t["id"]: t["completions"] for t in stats}
sys.exit(0 if done.get("iot0", 0) > 0 and done.get("iot1", 0) > 0 else 1)
PY
    check "$name: both IOThreads completed guest I/O" $? "($(tail -1 "$WORK/stats.qmp"))"
    if [ $rc = 0 ]; then
        grep -q '^DP-INFO .*queues=2 serial=vhost_user_blk ro=0 ' "$WORK/$name.log.dp"
        check "$name: guest sees 2 queues, serial, writable" $? "$(grep DP-INFO "$WORK/$name.log.dp")"
    fi
    stop_pid "$BACKEND_PID" 10
    check "$name: dataplane stopped on SIGTERM" $?
    BACKEND_PID=
    out=$(pattern_check_file "$IMG" 2)
    check "$name: host file holds the guest's pattern" $? "$out"
else
    check "$name: dataplane started" 1 "($(tail -3 "$WORK/backend.log"))"
fi

echo "multi-iothread-check: $passed passed, $failed failed"
if [ $failed = 0 ] && [ "${DP_VHOST_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
[ $failed = 0 ]
