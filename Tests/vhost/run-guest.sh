#!/usr/bin/env bash
# Boots the test guest (Tests/vhost/README.md) against a vhost-user-blk back end that is ALREADY
# listening on SOCKET, runs TEST inside it and checks the result lines.
#
#   run-guest.sh SOCKET TEST[,TEST...] [--queues N] [--smp N] [--mem SIZE] [--timeout SECS]
#                [--dp KEY=VALUE]... [--log FILE] [--reconnect] [--accel tcg|kvm] [--quiet]
#
#   TEST      what guest/init runs: info pattern write verify cache discard readloop bench
#   --queues  num-queues of vhost-user-blk-pci (default 2; the back end must offer at least that)
#   --smp     vCPUs (default 2)            --mem  guest RAM, also the memfd size (default 512M)
#   --timeout whole-run limit, seconds (default 120; a hung back end hangs the guest)
#   --dp      guest parameter, becomes dp.KEY=VALUE on the kernel command line
#             (seed, secs, mode, bs, count, jobs, warmup; see guest/init)
#   --log     serial console log (default CACHE/logs/guest-TIMESTAMP.log); written live, so a test
#             can wait for "DP-READY readloop" in it while this script runs in the background
#   --reconnect  adds reconnect=1 to the chardev (QEMU retries every second after a disconnect)
#
# Prints the guest's DP-* lines, then "run-guest: TEST ok|FAIL|NO-RESULT ... in S s".
# Exit status: 0 every test ok; 1 a test failed; 2 no result (timeout, QEMU error, guest crash);
# 3 usage or setup error.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2; exit 3; }

[ $# -ge 2 ] || usage
SOCK=$1 TESTS=$2
shift 2
QUEUES=2 SMP=2 MEM=512M TIMEOUT=120 LOG= RECONNECT= ACCEL=tcg QUIET=0
DP_ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --queues) QUEUES=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --dp) DP_ARGS+=("dp.$2"); shift 2 ;;
        --log) LOG=$2; shift 2 ;;
        --reconnect) RECONNECT=,reconnect=1; shift ;;
        --accel) ACCEL=$2; shift 2 ;;
        --quiet) QUIET=1; shift ;;
        -h|--help) usage ;;
        *) echo "run-guest: unknown option $1" >&2; usage ;;
    esac
done

if [ ! -e "$VHOST_CACHE/env.sh" ]; then
    "$VHOST_DIR/setup.sh" >&2 || exit 3
fi
. "$VHOST_CACHE/env.sh"
[ -r "$KERNEL" ] && [ -r "$INITRD" ] || { echo "run-guest: kernel/initrd missing; run setup.sh" >&2; exit 3; }

# QEMU connects at device realize and exits at once if nobody listens ("Failed to connect").
if [ ! -S "$SOCK" ]; then
    echo "run-guest: $SOCK is not a listening socket; start the back end first" >&2
    exit 3
fi

if [ -z "$LOG" ]; then
    mkdir -p "$VHOST_CACHE/logs"
    LOG=$VHOST_CACHE/logs/guest-$(date +%Y%m%d-%H%M%S)-$$.log
fi
: > "$LOG"

# share=on is the whole point: the back end maps guest RAM through the memfd. With share=off the
# back end maps a copy the guest never writes to, sees no request, and the guest hangs silently.
CMD=(qemu-system-x86_64 -accel "$ACCEL" -machine q35 -cpu max -smp "$SMP" -m "$MEM"
     -object "memory-backend-memfd,id=mem,size=$MEM,share=on" -numa node,memdev=mem
     -kernel "$KERNEL" -initrd "$INITRD"
     -append "console=ttyS0 quiet panic=-1 dp.test=$TESTS ${DP_ARGS[*]}"
     -chardev "socket,id=vu0,path=$SOCK$RECONNECT"
     -device "vhost-user-blk-pci,chardev=vu0,num-queues=$QUEUES"
     -nodefaults -display none -serial "file:$LOG" -no-reboot)

t0=$(date +%s.%N)
timeout -k 5 "$TIMEOUT" "${CMD[@]}" > "$LOG.qemu" 2>&1 < /dev/null
qrc=$?
secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

tr -d '\r' < "$LOG" | grep '^DP-' > "$LOG.dp" || true
[ $QUIET = 1 ] || cat "$LOG.dp"

verdict=ok rc=0
for t in ${TESTS//,/ }; do
    line=$(grep -m1 "^DP-RESULT $t " "$LOG.dp" || true)
    if [ -z "$line" ]; then
        verdict=NO-RESULT rc=2
        break
    fi
    case $line in "DP-RESULT $t ok"*) ;; *) verdict=FAIL rc=1 ;; esac
done
if [ $rc = 0 ] && ! grep -q '^DP-END status=ok' "$LOG.dp"; then verdict=NO-RESULT rc=2; fi
if [ $rc = 2 ] && grep -q '^DP-END status=fail' "$LOG.dp"; then verdict=FAIL rc=1; fi
[ $qrc = 124 ] && verdict="$verdict (timeout ${TIMEOUT}s)"

echo "run-guest: $TESTS $verdict accel=$ACCEL queues=$QUEUES smp=$SMP mem=$MEM in ${secs}s (qemu exit $qrc, log $LOG)"
if [ $rc != 0 ]; then
    echo "--- qemu output ($LOG.qemu):" >&2
    tail -20 "$LOG.qemu" >&2
    echo "--- last console lines ($LOG):" >&2
    tr -d '\r' < "$LOG" | tail -20 >&2
fi
exit $rc
