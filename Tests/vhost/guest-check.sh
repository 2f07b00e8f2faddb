#!/usr/bin/env bash
# Correctness checks with a real guest against one vhost-user-blk back end, given as a command
# template (placeholders in common.sh: @SOCK@ @FILE@ @QUEUES@ @QMP@ @PIDFILE@ @IOT_OPT@ @IOT_OBJECT@).
# qsd-check.sh runs it against qemu-storage-daemon, which proves the harness itself.
#
#   guest-check.sh [--name NAME] [--del-iothread on|off] -- TEMPLATE...
#
#   --name          label in the output (default: the template's first word)
#   --del-iothread  also delete the export of the IOThread variant under a reading guest
#                   (default on; qsd-check.sh turns it off: qemu-storage-daemon 7.2 deadlocks there)
#
# The back end must offer 2 queues (@QUEUES@ is 2), export id exp0, and with @QMP@ in the template
# answer QMP there (block-export-del, query-block-exports, event BLOCK_EXPORT_DELETED).
#
# For the export in the main loop and in an IOThread (@IOT_OBJECT@/@IOT_OPT@), on a fresh 64 MiB
# raw image each time:
#   - pattern (+ cache toggle, discard) with 1 and 2 queues; DP-INFO must show that many queues and
#     serial vhost_user_blk; afterwards the host file must hold the guest's pattern;
#   - verify: the host writes a pattern before the boot, the guest must read it;
#   - write: the guest only writes, the host checks the file.
# Then (only with @QMP@) readloop while the host deletes the export over QMP: the delete must
# return, the back end must stay responsive with no export and no socket file left, and the guest
# must still report; its reads stop (QEMU 7.2 without reconnect= never completes them).
#
# Prints "ok   NAME" / "FAIL NAME" per check and closes with "guest-check: N passed, M failed".
# Exit status 0 only when nothing failed. Logs stay in CACHE/guest-check.*/ on failure (or always
# with DP_VHOST_KEEP=1).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2; exit 3; }

NAME= DEL_IOTHREAD=on
while [ $# -gt 0 ]; do
    case $1 in
        --name) NAME=$2; shift 2 ;;
        --del-iothread) DEL_IOTHREAD=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) usage ;;
        -*) echo "guest-check: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
TEMPLATE=("$@")
NAME=${NAME:-$(basename "$1")}

"$VHOST_DIR/setup.sh" > /dev/null || exit 2
. "$VHOST_CACHE/env.sh"

WORK=$(mktemp -d "$VHOST_CACHE/guest-check.XXXXXX")
IMG=$WORK/disk.raw SOCK=$WORK/vhost.sock QMP=$WORK/qmp.sock PIDF=$WORK/backend.pid
passed=0 failed=0 BACKEND_PID=
check() { # NAME CONDITION-RC [DETAIL]
    if [ "$2" = 0 ]; then passed=$((passed + 1)); echo "ok   $1"
    else failed=$((failed + 1)); echo "FAIL $1 ${3:-}"; fi
}
cleanup() { [ -n "$BACKEND_PID" ] && stop_pid "$BACKEND_PID" 5; }
trap cleanup EXIT

backend_up() { # IOTHREAD NAME
    rm -f "$SOCK" "$QMP" "$PIDF"
    expand_template "$SOCK" "$IMG" 2 "$1" "$QMP" "$PIDF" "${TEMPLATE[@]}"
    start_backend "$WORK/backend-$2.log" "$BACKEND_READY" 15 "${BACKEND_CMD[@]}"
}
backend_down() {
    stop_pid "$BACKEND_PID" 10
    local rc=$?
    BACKEND_PID=
    return $rc
}
fresh_image() { rm -f "$IMG"; qemu-img create -q -f raw "$IMG" 64M; }

guest() { # NAME TESTS ARGS... -> runs the guest, checks rc, leaves the DP lines in $WORK/NAME.log.dp
    local name=$1 tests=$2
    shift 2
    "$VHOST_DIR/run-guest.sh" "$SOCK" "$tests" --log "$WORK/$name.log" --quiet "$@" | tee -a "$WORK/summary"
    local rc=${PIPESTATUS[0]}
    check "$name: guest $tests" "$rc" "(see $WORK/$name.log)"
    return "$rc"
}

for iot in 0 1; do
    where=main-loop
    [ $iot = 1 ] && where=iothread
    for q in 1 2; do
        name=$where-q$q-pattern
        fresh_image
        if backend_up $iot "$name"; then
            if guest "$name" pattern,cache,discard --queues $q --dp seed=$q; then
                grep -q "^DP-INFO .*queues=$q serial=vhost_user_blk ro=0 " "$WORK/$name.log.dp"
                check "$name: guest sees $q queue(s), serial, writable" $? "$(grep DP-INFO "$WORK/$name.log.dp")"
            fi
            backend_down
            check "$name: $NAME stopped on SIGTERM" $?
            out=$(pattern_check_file "$IMG" $q)
            check "$name: host file holds the guest's pattern" $? "$out"
        else
            check "$name: $NAME started" 1
        fi
    done

    name=$where-verify
    fresh_image
    pattern_write_file "$IMG" 7
    if backend_up $iot "$name"; then
        guest "$name" verify --dp seed=7
        backend_down
    else
        check "$name: $NAME started" 1
    fi

    name=$where-write
    fresh_image
    if backend_up $iot "$name"; then
        guest "$name" write --dp seed=9
        backend_down
        out=$(pattern_check_file "$IMG" 9)
        check "$name: host file holds the guest's pattern" $? "$out"
    else
        check "$name: $NAME started" 1
    fi
done

# readloop + block-export-del with the guest connected.
del_variants=(0)
[ "$DEL_IOTHREAD" = on ] && del_variants+=(1)
case " ${TEMPLATE[*]} " in
    *@QMP@*) ;;
    *) del_variants=(); echo "skip readloop-del: no @QMP@ in the template" ;;
esac
for iot in "${del_variants[@]}"; do
    where=main-loop
    [ $iot = 1 ] && where=iothread
    name=$where-readloop-del
    fresh_image
    if ! backend_up $iot "$name"; then
        check "$name: $NAME started" 1
        continue
    fi
    "$VHOST_DIR/run-guest.sh" "$SOCK" readloop --dp secs=8 --log "$WORK/$name.log" --quiet \
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
    python3 "$VHOST_DIR/qmp.py" --timeout 5 "$QMP" query-block-exports > "$WORK/$name.qmp2"
    grep -q '{"return":\[\]}' "$WORK/$name.qmp2"
    check "$name: back end responsive, no exports left" $? "$(cat "$WORK/$name.qmp2")"
    [ ! -e "$SOCK" ]
    check "$name: socket file removed" $?
    wait $guest_pid
    rc=$?
    grep -E '^run-guest' "$WORK/$name.out"
    line=$(grep '^DP-RESULT readloop' "$WORK/$name.log.dp" || true)
    echo "$line"
    check "$name: guest reported after the delete (no guest hang)" $rc
    # Without reconnect= QEMU never completes the reads in flight at the cut (qemu-storage-daemon 7.2 behaves the same; Tests/vhost/README.md),
    # so the guest's reader either fails (errors) or stalls; it must not keep completing.
    [[ $line =~ errors=([0-9]+)\ stalled_secs=([0-9]+) ]] && { [ "${BASH_REMATCH[1]}" -gt 0 ] || [ "${BASH_REMATCH[2]}" -ge 2 ]; }
    check "$name: guest I/O stopped at the delete (errors or stalled)" $? "$line"
    backend_down
done

echo "guest-check: $passed passed, $failed failed"
if [ $failed = 0 ] && [ -z "${DP_VHOST_KEEP:-}" ]; then rm -rf "$WORK"; else echo "logs kept in $WORK"; fi
[ $failed = 0 ]
