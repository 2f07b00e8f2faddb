#!/usr/bin/env bash
# Side-by-side benchmark: the same guest workload against qemu-storage-daemon's vhost-user-blk
# export and against a candidate back end, same image file, same queues, same IOThread setting.
#
#   bench.sh [OPTIONS] [--] BACKEND_CMD...
#
# BACKEND_CMD is a command template with the placeholders of common.sh: @SOCK@ (socket to listen
# on), @FILE@ (the same raw image qemu-storage-daemon exports), @QUEUES@, @QMP@, @PIDFILE@ (if used,
# the pid file is the readiness signal, else the socket appearing is), @IOT_OPT@ (",iothread=iot0"
# or nothing) and, as an argument of its own, @IOT_OBJECT@ ("--object iothread,id=iot0" or
# nothing). Use the IOT placeholders so the candidate gets the same IOThread setting as the
# reference, which runs common.sh's QSD_TEMPLATE. The candidate is stopped with SIGTERM after each
# run.
#
# OPTIONS
#   --runs N (3)           runs (guest boots) per back end, interleaved (A B, B A, A B, ...)
#   --reps N (3)           measured passes inside each boot; a run's value is its best pass, so
#                          a burst of load from elsewhere on the 2 shared cores does not count
#   --queues N (2)         guest queues (num-queues); also @QUEUES@
#   --iothread on|off (on) qemu-storage-daemon in an IOThread or in its main loop
#   --mode read|write (read)  --bs BYTES (4096)  --count N per job (8192)  --jobs N (queues)
#   --size SIZE (256M)     image size (fully allocated, so reads hit data, not holes)
#   --name LABEL (candidate)  --timeout SECS per guest run (300)  --smp N (2)  --mem SIZE (512M)
#
# Example, reference against itself (proves the harness):
#   Tests/vhost/bench.sh --name qsd-again -- qemu-storage-daemon @IOT_OBJECT@ \
#     --blockdev driver=file,node-name=file0,filename=@FILE@ \
#     --blockdev driver=raw,node-name=disk0,file=file0 \
#     --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=@SOCK@,writable=on,num-queues=@QUEUES@@IOT_OPT@
#
# Output: a table (per-run IOPS, median, spread) for both back ends, MB/s medians, and the ratio
# candidate/reference; also parseable lines
#   BENCH-RESULT backend=NAME runs=IOPS,IOPS,IOPS median_iops=N median_mbps=X
#   BENCH-RATIO iops=X mbps=X
# Exit status 0 when every run produced a DP-BENCH line, 1 otherwise, 3 usage.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&2; exit 3; }

RUNS=3 REPS=3 QUEUES=2 IOTHREAD=on MODE=read BS=4096 COUNT=8192 JOBS= SIZE=256M NAME=candidate
TIMEOUT=300 SMP=2 MEM=512M
while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --queues) QUEUES=$2; shift 2 ;;
        --iothread) IOTHREAD=$2; shift 2 ;;
        --mode) MODE=$2; shift 2 ;;
        --bs) BS=$2; shift 2 ;;
        --count) COUNT=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --name) NAME=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "bench: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
case $IOTHREAD in on) IOT=1 ;; off) IOT=0 ;; *) usage ;; esac
JOBS=${JOBS:-$QUEUES}
TEMPLATE=("$@")

"$VHOST_DIR/setup.sh" > /dev/null || exit 3
. "$VHOST_CACHE/env.sh"

WORK=$(mktemp -d "$VHOST_CACHE/bench.XXXXXX")
IMG=$WORK/disk.raw SOCK=$WORK/vhost.sock QMP=$WORK/qmp.sock PIDF=$WORK/backend.pid
BACKEND_PID=
trap '[ -n "$BACKEND_PID" ] && stop_pid "$BACKEND_PID" 5' EXIT

qemu-img create -q -f raw -o preallocation=full "$IMG" "$SIZE" || exit 3

# One guest boot against back end A (reference) or B (candidate). Appends "IOPS MBPS" (its best
# pass) or "fail" to WORK/A.runs or WORK/B.runs.
one_run() { # A|B RUN
    local which=$1 run=$2 label log
    rm -f "$SOCK" "$QMP" "$PIDF"
    # Flush what the image creation or the previous (write) run left dirty, so its writeback
    # does not land in this run.
    sync
    if [ $which = A ]; then
        label=qsd
        expand_template "$SOCK" "$IMG" "$QUEUES" "$IOT" "$QMP" "$PIDF" "${QSD_TEMPLATE[@]}"
    else
        label=$NAME
        expand_template "$SOCK" "$IMG" "$QUEUES" "$IOT" "$QMP" "$PIDF" "${TEMPLATE[@]}"
    fi
    if ! start_backend "$WORK/$which$run.backend.log" "$BACKEND_READY" 15 "${BACKEND_CMD[@]}"; then
        echo fail >> "$WORK/$which.runs"
        return
    fi
    log=$WORK/$which$run.guest.log
    "$VHOST_DIR/run-guest.sh" "$SOCK" bench --queues "$QUEUES" --smp "$SMP" --mem "$MEM" \
        --timeout "$TIMEOUT" --log "$log" --quiet \
        --dp mode="$MODE" --dp bs="$BS" --dp count="$COUNT" --dp jobs="$JOBS" --dp reps="$REPS" > "$WORK/$which$run.out" 2>&1
    local rc=$?
    stop_pid "$BACKEND_PID" 10
    BACKEND_PID=
    local line
    # The best pass of this boot (highest IOPS).
    line=$(grep '^DP-BENCH ' "$log.dp" 2>/dev/null | sed 's/.* iops=\([0-9]*\) .*/\1 &/' | sort -n | tail -1 | cut -d' ' -f2- || true)
    if [ $rc = 0 ] && [ -n "$line" ]; then
        echo "$line" | awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } print v["iops"], v["mbps"] }' >> "$WORK/$which.runs"
        vlog "run $run $label: ${line#DP-BENCH }"
    else
        echo fail >> "$WORK/$which.runs"
        vlog "run $run $label: FAILED (rc $rc, see $WORK/$which$run.out)"
        cat "$WORK/$which$run.out" >&2
    fi
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
: > "$WORK/A.runs"; : > "$WORK/B.runs"
for (( r = 1; r <= RUNS; r++ )); do
    if (( r % 2 )); then one_run A $r; one_run B $r; else one_run B $r; one_run A $r; fi
done

median() { # COLUMN FILE -> median of the numbers in COLUMN, or "fail"
    if grep -q fail "$2"; then echo fail; return; fi
    awk -v c="$1" '{ print $c }' "$2" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
spread() { # FILE -> max/min of column 1
    if grep -q fail "$1"; then echo n/a; return; fi
    awk 'NR == 1 || $1 < lo { lo = $1 } NR == 1 || $1 > hi { hi = $1 } END { if (lo > 0) printf "%.2f", hi / lo; else print "n/a" }' "$1"
}
ratio() { # B A
    case "$1$2" in *fail*) echo n/a; return ;; esac
    awk -v b="$1" -v a="$2" 'BEGIN { if (a > 0) printf "%.3f", b / a; else print "n/a" }'
}

A_IOPS=$(median 1 "$WORK/A.runs") A_MBPS=$(median 2 "$WORK/A.runs")
B_IOPS=$(median 1 "$WORK/B.runs") B_MBPS=$(median 2 "$WORK/B.runs")
ACCEL_NOTE="accel=tcg (no KVM: guest CPU is emulated, so absolute numbers are far below hardware; compare ratios)"

echo
echo "vhost-user-blk benchmark  $ACCEL_NOTE"
echo "guest: q35 smp=$SMP mem=$MEM (memfd share=on) Linux $KVER, num-queues=$QUEUES"
echo "workload: dd O_DIRECT $MODE bs=$BS, $JOBS parallel jobs x $COUNT blocks (queue depth $JOBS); $RUNS boots each, interleaved; best of $REPS passes per boot"
echo "image: $SIZE raw, preallocated, same file for both; qemu-storage-daemon iothread=$IOTHREAD, default cache (host page cache)"
echo "reference: ${QSD_TEMPLATE[*]}"
echo "candidate: ${TEMPLATE[*]}"
echo
{
    printf '%-22s' backend
    for (( r = 1; r <= RUNS; r++ )); do printf '%10s' "run$r"; done
    printf '%10s %10s %8s\n' median MB/s spread
    for w in A B; do
        [ $w = A ] && printf '%-22s' qemu-storage-daemon || printf '%-22s' "$NAME"
        while read -r iops mbps; do printf '%10s' "$iops"; done < "$WORK/$w.runs"
        [ $w = A ] && printf '%10s %10s' "$A_IOPS" "$A_MBPS" || printf '%10s %10s' "$B_IOPS" "$B_MBPS"
        printf '%8s\n' "$(spread "$WORK/$w.runs")"
    done
} | sed 's/^/  /'
echo "  (IOPS per run = best pass of that boot; MB/s is the median of the per-run MB/s; spread = max/min IOPS of that back end)"
echo "  load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  ratio $NAME/qemu-storage-daemon: IOPS $(ratio "$B_IOPS" "$A_IOPS"), MB/s $(ratio "$B_MBPS" "$A_MBPS")"
echo
echo "BENCH-RESULT backend=qemu-storage-daemon runs=$(awk '{ print $1 }' "$WORK/A.runs" | paste -sd,) median_iops=$A_IOPS median_mbps=$A_MBPS"
echo "BENCH-RESULT backend=$NAME runs=$(awk '{ print $1 }' "$WORK/B.runs" | paste -sd,) median_iops=$B_IOPS median_mbps=$B_MBPS"
echo "BENCH-RATIO iops=$(ratio "$B_IOPS" "$A_IOPS") mbps=$(ratio "$B_MBPS" "$A_MBPS")"

if grep -q fail "$WORK/A.runs" "$WORK/B.runs"; then
    echo "bench: some runs failed; logs kept in $WORK"
    exit 1
fi
rm -rf "$WORK"
