# Shared by the scripts in Tests/vhost (sourced, not run).
#
# Defines the repository root, the cache directory and the one pattern format that the guest
# (guest/init) and the host both produce, so that either side can check what the other wrote.

VHOST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$VHOST_DIR/../.." && pwd)
# Everything generated (kernel, modules, initramfs, logs of the check scripts) lives here.
# `.build*/` is git-ignored, so the default never shows up in `git status`.
VHOST_CACHE=${DP_VHOST_CACHE:-$REPO_ROOT/.build-vhost}

vlog() { printf '%s %s\n' "[$(date +%H:%M:%S)]" "$*" >&2; }
die() { vlog "error: $*"; exit 2; }

# The pattern region: 64 KiB at a 4 KiB-aligned byte offset, 1024 records of 64 bytes, record i
# being printf '%-63s\n' "dataplane seed=S off=O rec=i". guest/init uses the same awk program.
PATTERN_LEN=65536
pattern_region() { # SEED OFFSET -> 64 KiB on stdout
    awk -v s="$1" -v o="$2" 'BEGIN { for (i = 0; i < 1024; i++) printf "%-63s\n", "dataplane seed=" s " off=" o " rec=" i }'
}

# The offsets the pattern tests use for a disk of SIZE bytes (same rule as guest/init):
# the start, an odd 4 KiB block, the middle, and the last 64 KiB.
pattern_offsets() { # SIZE_BYTES
    local size=$1
    local mid=$(( size / 2 / 4096 * 4096 ))
    local last=$(( size - PATTERN_LEN ))
    printf '%s\n' 0 503808 "$mid" "$last" | awk '!seen[$0]++'
}

# Writes the pattern for SEED into FILE on the host (as a guest would see it at the same offsets).
pattern_write_file() { # FILE SEED
    local file=$1 seed=$2 size off
    size=$(stat -c %s "$file")
    for off in $(pattern_offsets "$size"); do
        pattern_region "$seed" "$off" | dd of="$file" bs=4096 seek=$(( off / 4096 )) conv=notrunc status=none
    done
}

# Checks that FILE holds the pattern for SEED. Prints one line per region that differs.
pattern_check_file() { # FILE SEED
    local file=$1 seed=$2 size off bad=0
    size=$(stat -c %s "$file")
    for off in $(pattern_offsets "$size"); do
        if ! cmp -s <(pattern_region "$seed" "$off") \
                    <(dd if="$file" bs=4096 skip=$(( off / 4096 )) count=16 status=none); then
            echo "pattern mismatch in $file at offset $off (seed $seed)"
            bad=1
        fi
    done
    return $bad
}

# Waits until PATH is a socket or TIMEOUT seconds passed; fails early if PID died.
wait_for_socket() { # PATH TIMEOUT [PID]
    local path=$1 deadline=$(( SECONDS + $2 )) pid=${3:-}
    while [ ! -S "$path" ]; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
        [ $SECONDS -ge $deadline ] && return 1
        sleep 0.05
    done
}

# Stops PID with SIGTERM, then SIGKILL after GRACE seconds. Returns 0 when it ended on SIGTERM.
stop_pid() { # PID [GRACE]
    local pid=$1 grace=${2:-10} i
    kill -TERM "$pid" 2>/dev/null || return 0
    for (( i = 0; i < grace * 20; i++ )); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
        sleep 0.05
    done
    vlog "pid $pid ignored SIGTERM for ${grace}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 1
}

# Back ends are given as command templates. Placeholders inside an argument:
#   @SOCK@ vhost-user socket to listen on   @FILE@ raw image   @QUEUES@ queues to offer
#   @QMP@ QMP socket path                    @PIDFILE@ pid file (then it is the readiness signal,
#                                            else the socket appearing is)
#   @IOT_OPT@ ",iothread=iot0" or nothing (append to the export's option string)
# and one that stands alone as an argument and becomes zero or two arguments:
#   @IOT_OBJECT@ "--object iothread,id=iot0" or nothing
# so one template serves both the main-loop and the IOThread variant.
# The reference back end, qemu-storage-daemon (Tests/vhost/README.md); its pid file is written after the export exists.
QSD_TEMPLATE=(qemu-storage-daemon @IOT_OBJECT@
    --blockdev driver=file,node-name=file0,filename=@FILE@
    --blockdev driver=raw,node-name=disk0,file=file0
    --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=@SOCK@,writable=on,num-queues=@QUEUES@@IOT_OPT@
    --chardev socket,id=qmp0,path=@QMP@,server=on,wait=off --monitor chardev=qmp0
    --pidfile @PIDFILE@)

# Sets BACKEND_CMD (the expanded template) and BACKEND_READY (the path to wait for).
expand_template() { # SOCK FILE QUEUES IOTHREAD(0|1) QMP PIDFILE TEMPLATE...
    local sock=$1 file=$2 queues=$3 iot=$4 qmp=$5 pidfile=$6 a iotopt=
    shift 6
    [ "$iot" = 1 ] && iotopt=,iothread=iot0
    BACKEND_CMD=() BACKEND_READY=$sock
    for a in "$@"; do
        if [ "$a" = @IOT_OBJECT@ ]; then
            # DP_VHOST_IOT_PROPS (e.g. ",poll-max-ns=0") tunes the IOThread: polling off and on.
            [ "$iot" = 1 ] && BACKEND_CMD+=(--object "iothread,id=iot0${DP_VHOST_IOT_PROPS:-}")
            continue
        fi
        case $a in *@PIDFILE@*) BACKEND_READY=$pidfile ;; esac
        a=${a//@SOCK@/$sock}; a=${a//@FILE@/$file}; a=${a//@QUEUES@/$queues}
        a=${a//@QMP@/$qmp}; a=${a//@PIDFILE@/$pidfile}; a=${a//@IOT_OPT@/$iotopt}
        BACKEND_CMD+=("$a")
    done
}

# Starts "$@" in the background with output to LOG and waits until READY (a path) exists.
# Sets BACKEND_PID. READY is the pid file for qemu-storage-daemon, the socket for anything else;
# a socket file appears at bind(), a moment before listen(), hence the short pause after it.
start_backend() { # LOG READY TIMEOUT CMD...
    local log=$1 ready=$2 timeout=$3
    shift 3
    "$@" > "$log" 2>&1 < /dev/null &
    BACKEND_PID=$!
    local deadline=$(( SECONDS + timeout ))
    while [ ! -e "$ready" ]; do
        if ! kill -0 "$BACKEND_PID" 2>/dev/null; then
            vlog "back end exited before it was ready: $*"; tail -5 "$log" >&2; return 1
        fi
        if [ $SECONDS -ge $deadline ]; then
            vlog "back end not ready after ${timeout}s: $*"; tail -5 "$log" >&2; return 1
        fi
        sleep 0.05
    done
    [ -S "$ready" ] && sleep 0.2
    return 0
}
