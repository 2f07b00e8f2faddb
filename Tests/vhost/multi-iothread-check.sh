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
# I/O, stops the back end with SIGTERM, and checks that the host file holds the guest's pattern.
# Then a guest reads on both queues while the host deletes the export over QMP: the delete must
# return and leave neither IOThread holding the export. Prints "ok   NAME" / "FAIL NAME" per check and closes with
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

backend_up() { # NAME: a fresh image and the export on iot0 + iot1
    rm -f "$IMG" "$SOCK" "$QMP"
    qemu-img create -q -f raw "$IMG" 64M
    start_backend "$WORK/backend-$1.log" "$SOCK" 15 "$DATAPLANE" serve \
        --object iothread,id=iot0 --object iothread,id=iot1 \
        --blockdev "driver=file,node-name=file0,filename=$IMG" \
        --blockdev driver=raw,node-name=disk0,file=file0 \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=2,iothread.0=iot0,iothread.1=iot1" \
        --chardev "socket,id=qmp0,path=$QMP,server=on,wait=off" --monitor chardev=qmp0
}

name=2iothreads-q2-pattern
if backend_up "$name"; then
    python3 "$VHOST_DIR/qmp.py" --timeout 5 "$QMP" query-iothreads > "$WORK/iothreads.qmp"
    holders=$(grep -o '"holders":\[{"type":"block-node","node-name":"disk0"}\]' "$WORK/iothreads.qmp" | wc -l)
    check "$name: both IOThreads are held by the exported node" $([ "$holders" = 2 ]; echo $?) "($(cat "$WORK/iothreads.qmp"))"
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
    check "$name: dataplane started" 1 "($(tail -3 "$WORK/backend-$name.log"))"
fi

# A reading guest on both queues while the host deletes the export: the delete must drain the
# queues on both IOThreads and return, and release both IOThreads.
name=2iothreads-readloop-del
if backend_up "$name"; then
    "$VHOST_DIR/run-guest.sh" "$SOCK" readloop --queues 2 --dp secs=8 --log "$WORK/$name.log" --quiet \
        > "$WORK/$name.out" 2>&1 &
    guest_pid=$!
    for (( i = 0; i < 600; i++ )); do  # up to 60 s for the boot
        grep -q 'DP-PROGRESS t=1 ' "$WORK/$name.log" 2>/dev/null && break
        kill -0 $guest_pid 2>/dev/null || break
        sleep 0.1
    done
    grep -q 'DP-PROGRESS t=1 ' "$WORK/$name.log"
    check "$name: guest reads before the delete" $?
    python3 "$VHOST_DIR/qmp.py" --timeout 10 "$QMP" block-export-del '{"id": "exp0"}' > "$WORK/$name.qmp"
    rc=$?
    check "$name: block-export-del returns (no host-side hang)" $rc "(qmp.py exit $rc)"
    grep -q '"event":"BLOCK_EXPORT_DELETED"' "$WORK/$name.qmp"
    check "$name: BLOCK_EXPORT_DELETED emitted" $?
    python3 "$VHOST_DIR/qmp.py" --timeout 5 "$QMP" query-iothreads > "$WORK/$name.qmp2"
    holders=$(grep -o '"holders":\[\]' "$WORK/$name.qmp2" | wc -l)
    check "$name: neither IOThread holds the export any more" $([ "$holders" = 2 ]; echo $?) "($(cat "$WORK/$name.qmp2"))"
    wait $guest_pid
    check "$name: guest reported after the delete (no guest hang)" $? "($(grep -E '^run-guest' "$WORK/$name.out"))"
    stop_pid "$BACKEND_PID" 10
    check "$name: dataplane stopped on SIGTERM" $?
    BACKEND_PID=
else
    check "$name: dataplane started" 1 "($(tail -3 "$WORK/backend-$name.log"))"
fi

echo "multi-iothread-check: $passed passed, $failed failed"
if [ $failed = 0 ] && [ "${DP_VHOST_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
[ $failed = 0 ]
