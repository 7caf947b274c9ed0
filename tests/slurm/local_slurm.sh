#!/usr/bin/env bash
# local_slurm.sh -- run a private, real Slurm cluster on this one machine
# (for tests): its own munged, slurmctld and slurmd, all as root,
# all state/config/logs in one directory, no systemd, no /etc/slurm.
#
# Usage: local_slurm.sh {install|start|stop|restart|status|env|wait-job}
#
#   install  apt-get install slurmctld slurmd slurm-client munge (only if
#            missing; with DSI_SLURM_WITH_PMIX=1 also libpmix for --mpi=pmix)
#   start    write config, start munged + slurmctld + slurmd, wait until the
#            node is idle and the scheduler runs; prints "export SLURM_CONF=..."
#            on stdout (progress goes to stderr), so
#            eval "$(local_slurm.sh start)"  works. If already running: only
#            prints the line (use restart to apply changed DSI_SLURM_* settings)
#   stop     cancel jobs, stop the daemons, leave no process of ours behind
#   status   exit 0 if all daemons run, 3 if none, 1 if only some
#   restart  stop + start
#   env      print the export line only
#   wait-job JOBID [TIMEOUT]
#            poll until the job ends (0.5 s steps; sbatch --wait polls in
#            steps of 2 s and more); exit 0 iff it ended COMPLETED (for a
#            job array: every task of it)
#
# Settings (environment):
#   DSI_SLURM_DIR            state dir              [/tmp/dsi-slurm]
#   DSI_SLURM_NODES          nodes (one slurmd each, all on this machine) [1]
#   DSI_SLURM_CPUS           CPUs a node claims     [16] (more than real is ok)
#   DSI_SLURM_GPUS           GPUs a node claims     [0] (fake: /dev/null links;
#                            Slurm sets CUDA_VISIBLE_DEVICES, nothing runs on them)
#   DSI_SLURM_MEM_MB         RealMemory of a node   [MemTotal of this machine]
#   DSI_SLURM_CTLD_PORT      slurmctld port         [6817]
#   DSI_SLURM_SLURMD_PORT    first slurmd's port    [6818] (node i: 6818 + i - 1)
#   DSI_SLURM_START_TIMEOUT  seconds per start wait [60]
#   DSI_SLURM_STOP_TIMEOUT   seconds per stop wait  [30]
#   DSI_SLURM_MPI_DEFAULT    MpiDefault             [none] (pmi2: bare srun works)
#   DSI_SLURM_WITH_PMIX      install: add libpmix   [0]
#   DSI_SLURM_KEEP_ON_FAILURE  1: a failed start leaves its daemons running
#                              (for debugging); default: it stops them
set -euo pipefail

# Absolute paths matter: they end up in slurm.conf and in munge's socket path.
TEMPLATE=$(dirname "$(realpath "$0")")/slurm.conf.in
STATE_DIR=$(realpath -m "${DSI_SLURM_DIR:-/tmp/dsi-slurm}")
NODES=${DSI_SLURM_NODES:-1}
CPUS=${DSI_SLURM_CPUS:-16}
GPUS=${DSI_SLURM_GPUS:-0}
CTLD_PORT=${DSI_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${DSI_SLURM_SLURMD_PORT:-6818}
START_TIMEOUT=${DSI_SLURM_START_TIMEOUT:-60}
STOP_TIMEOUT=${DSI_SLURM_STOP_TIMEOUT:-30}
WITH_PMIX=${DSI_SLURM_WITH_PMIX:-0}
# shellcheck disable=SC2034  # used by the template
MPI_DEFAULT=${DSI_SLURM_MPI_DEFAULT:-none}
# Job ids go on from where no earlier start (of this or another test cluster here) left
# them: MPICH names its shared-memory segment after the PMI KVS name, which Slurm's pmi2
# makes JOBID.STEPID, and a killed run leaves its segment in /dev/shm. With ids restarting
# at 1, job 1's step 1 met the segment of an earlier cluster's killed job 1 step 1 and hung
# (or failed in MPI_Init). A new block of 1000 ids every second; it wraps after 16 hours.
# shellcheck disable=SC2034  # used by the template
FIRST_JOB_ID=$(($(date +%s) % 60000 * 1000 + 1))

ETC=$STATE_DIR/etc
LOG=$STATE_DIR/log
RUN=$STATE_DIR/run
SPOOL=$STATE_DIR/spool
MUNGE_DIR=$STATE_DIR/munge
CONF=$ETC/slurm.conf
MUNGE_SOCK=$MUNGE_DIR/munge.socket
MUNGE_PID=$MUNGE_DIR/munged.pid
MUNGE_LOG=$MUNGE_DIR/munged.log  # munged insists its log dir is not world-writable
CTLD_PID=$RUN/slurmctld.pid
CTLD_LOG=$LOG/slurmctld.log
FAKE_DEV=$STATE_DIR/dev

# slurmctld only accepts to run on the host named in SlurmctldHost, and it
# compares against the short hostname; so a lone node is named after it too.
# Several nodes are several slurmds on this host (slurmd -N NAME, one port,
# spool dir, pid file and log each: the %n in slurm.conf); their names are
# HOST-n1, HOST-n2, ... Jobs see SLURMD_NODENAME and their own node's GPUs;
# with block or cyclic placement Slurm's PMI also tells MPI which ranks share
# a node (not with --distribution=arbitrary: see dsi_mpi/devices.py).
HOST=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)
HOST=${HOST:-localhost}
[[ $NODES =~ ^[1-9][0-9]?$ ]] || { echo "local_slurm: DSI_SLURM_NODES must be 1..99, got '$NODES'" >&2; exit 2; }
[[ $GPUS =~ ^[0-9]+$ && $CPUS =~ ^[1-9][0-9]*$ ]] ||
    { echo "local_slurm: DSI_SLURM_CPUS/DSI_SLURM_GPUS must be integers" >&2; exit 2; }
NODE_NAMES=()
if ((NODES == 1)); then
    NODE_NAMES=("$HOST")
else
    for ((i = 1; i <= NODES; i++)); do NODE_NAMES+=("$HOST-n$i"); done
fi
slurmd_pidfile() { echo "$RUN/slurmd-$1.pid"; }
slurmd_log() { echo "$LOG/slurmd-$1.log"; }

# Every Slurm client call below must see our config, never /etc/slurm.
export SLURM_CONF=$CONF

log() { echo "local_slurm: $*" >&2; }

# die MESSAGE [LOGFILE...] -- print message, the tail of each log, exit 1.
die() {
    local msg=$1; shift
    log "ERROR: $msg"
    local f
    for f in "$@"; do
        if [[ -s $f ]]; then
            echo "----- last lines of $f -----" >&2
            tail -n 30 "$f" >&2
            echo "-----" >&2
        fi
    done
    # A failed start must not leak half a cluster into the caller's machine.
    if [[ $CLEANUP_ON_FAILURE == 1 ]]; then
        CLEANUP_ON_FAILURE=0
        log "stopping what was started (DSI_SLURM_KEEP_ON_FAILURE=1 to keep it)"
        stop || true
    fi
    exit 1
}
CLEANUP_ON_FAILURE=0

# ---------------------------------------------------------------- processes

# pid_of PIDFILE PATTERN -- print the pid in PIDFILE if that process is alive
# AND its command line contains PATTERN (a path only our instance uses), so a
# stale pid file whose pid got reused by something else is never trusted.
pid_of() {
    local pidfile=$1 pattern=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern" || return 1
    echo "$pid"
}

ctld_pid()   { pid_of "$CTLD_PID" "$CONF"; }
slurmd_pid() { pid_of "$(slurmd_pidfile "$1")" "$CONF"; }
munged_pid() { pid_of "$MUNGE_PID" "$MUNGE_SOCK"; }

# Orphaned slurmstepd processes of our cluster: they inherit slurmd's
# environment, which contains our SLURM_CONF.
# (Reads /proc directly: minimal containers often lack procps/pgrep.)
our_stepds() {
    local d comm
    for d in /proc/[0-9]*; do
        { read -r comm <"$d/comm"; } 2>/dev/null || continue
        [[ $comm == slurmstepd ]] || continue
        alive "${d#/proc/}" || continue  # zombies have no environ
        if { tr '\0' '\n' <"$d/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
            echo "${d#/proc/}"
        fi
    done
}

# descendants PID... -- all (transitive) children of the given pids.
descendants() {
    local d stat ppid pid
    local -A kids=()
    for d in /proc/[0-9]*; do
        { read -r stat <"$d/stat"; } 2>/dev/null || continue
        stat=${stat##*) }
        read -r _ ppid _ <<<"$stat"
        kids[$ppid]+=" ${d#/proc/}"
    done
    local queue=("$@")
    while ((${#queue[@]})); do
        pid=${queue[0]}
        queue=("${queue[@]:1}")
        for d in ${kids[$pid]:-}; do
            echo "$d"
            queue+=("$d")
        done
    done
}

# After an unclean end (daemons killed, or jobs not cancellable) slurmstepd
# processes and the job processes under them survive. slurmstepd ignores
# SIGTERM, so SIGKILL the whole tree; collect it first, since children of a
# dead stepd get reparented to PID 1 and could no longer be found.
kill_leftover_steps() {
    local stepds pids
    mapfile -t stepds < <(our_stepds)
    ((${#stepds[@]})) || return 0
    mapfile -t pids < <(descendants "${stepds[@]}")
    pids=("${stepds[@]}" "${pids[@]}")
    log "killing leftover job steps and their processes: ${pids[*]}"
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait_until 5 all_dead "${pids[@]}" || log "WARNING: could not kill all of: ${pids[*]}"
}

# wait_until TIMEOUT CMD... -- poll CMD every 0.5 s; 1 if it never succeeded.
wait_until() {
    local timeout=$1; shift
    local deadline=$((SECONDS + timeout))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# alive PID -- true if running. A zombie counts as dead: our daemons are
# reparented to PID 1, and in containers PID 1 often reaps late or never
# (seen here: ~2 s), so "kill -0" would keep succeeding on a dead daemon.
alive() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }  # the state letter follows "(comm) "
    [[ ${stat%% *} != Z ]]
}

# terminate NAME:PID... -- SIGTERM all at once (daemons take 1-2 s each to
# exit, in parallel that is paid once), bounded wait, then SIGKILL stragglers.
terminate() {
    local np pids=()
    for np in "$@"; do
        alive "${np#*:}" || continue
        log "stopping ${np%%:*} (pid ${np#*:})"
        kill -TERM "${np#*:}" 2>/dev/null || true
        pids+=("${np#*:}")
    done
    ((${#pids[@]})) || return 0
    wait_until "$STOP_TIMEOUT" all_dead "${pids[@]}" && return 0
    log "still alive after ${STOP_TIMEOUT}s, sending SIGKILL: $*"
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait_until 5 all_dead "${pids[@]}" || die "cannot kill: $*"
}

all_dead() {
    local p
    for p in "$@"; do alive "$p" && return 1; done
    return 0
}

port_busy() { timeout 2 bash -c ": </dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# ---------------------------------------------------------------- install

install() {
    local pkgs=(slurmctld slurmd slurm-client munge) missing=() p
    # Slurm's mpi_pmix plugin dlopen()s the UNversioned pmix2/lib/libpmix.so, which
    # only libpmix-dev ships; libpmix2 alone leaves --mpi=pmix unusable.
    [[ $WITH_PMIX == 1 ]] && pkgs+=(libpmix2 libpmix-dev)
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "already installed: ${pkgs[*]}"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "install needs root (apt-get)"
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    # --no-install-recommends: slurm-wlm would pull sview/GTK and friends.
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

# ---------------------------------------------------------------- config

# render_config -- slurm.conf for the current settings, on stdout: the template with each
# @NAME@ replaced by $NAME (an unknown name fails: set -u), then the nodes.
render_config() {
    local mem name i gres="" line
    mem=${DSI_SLURM_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)}
    while IFS= read -r line; do
        while [[ $line =~ @([A-Z_]+)@ ]]; do
            name=${BASH_REMATCH[1]}
            line=${line//"@$name@"/${!name}}
        done
        printf '%s\n' "$line"
    done <"$TEMPLATE"
    # Fake GPUs (see render_gres): Slurm schedules --gpus* requests and sets
    # CUDA_VISIBLE_DEVICES, but nothing can compute on them.
    if ((GPUS > 0)); then
        echo "GresTypes=gpu"
        gres=" Gres=gpu:$GPUS"
    fi
    for ((i = 0; i < NODES; i++)); do
        name=${NODE_NAMES[i]}
        echo "NodeName=$name NodeAddr=127.0.0.1 NodeHostname=$HOST Port=$((SLURMD_PORT + i)) CPUs=$CPUS RealMemory=$mem$gres State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODE_NAMES[*]}") Default=YES MaxTime=INFINITE State=UP"
}

# render_gres -- gres.conf. GPU i of every node is a link to /dev/null: Slurm
# insists on a character device and takes the index from the trailing digits.
render_gres() {
    echo "AutoDetect=off"
    ((GPUS > 0)) || return 0
    echo "NodeName=$(IFS=,; echo "${NODE_NAMES[*]}") Name=gpu File=$FAKE_DEV/gpu[0-$((GPUS - 1))]"
}

write_config() {
    local i
    mkdir -p "$ETC" "$LOG" "$RUN" "$SPOOL/ctld" "$FAKE_DEV"
    for i in "${NODE_NAMES[@]}"; do mkdir -p "$SPOOL/d-$i"; done
    for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$FAKE_DEV/gpu$i"; done
    render_config >"$CONF"
    render_gres >"$ETC/gres.conf"
    : >"$ETC/plugstack.conf"
}

# config_current -- the files on disk are what today's settings would write (FirstJobId
# apart: it is new on every start).
config_current() {
    [[ -r $CONF && -r $ETC/gres.conf ]] &&
        [[ $(render_config | grep -v '^FirstJobId=') == "$(grep -v '^FirstJobId=' "$CONF")" &&
            $(render_gres) == "$(cat "$ETC/gres.conf")" ]]
}

# ---------------------------------------------------------------- start

start_munged() {
    # munged demands: socket dir world-searchable, key owned by us and 0600,
    # log dir not writable by others. Hence a dedicated 0755 directory.
    mkdir -p "$MUNGE_DIR"
    chmod 0755 "$STATE_DIR" "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        log "creating munge key"
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chmod 0600 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock" "$MUNGE_PID"
    log "starting munged"
    # munged forks itself and closes stdio (important for callers that capture
    # our output through a pipe: no daemon may keep that pipe open).
    munged --socket="$MUNGE_SOCK" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_PID" --log-file="$MUNGE_LOG" \
        --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$MUNGE_LOG" 2>&1 ||
        die "munged failed to start" "$MUNGE_LOG"
    wait_until "$START_TIMEOUT" munge_works || die "munged not answering on $MUNGE_SOCK" "$MUNGE_LOG"
}

munge_works() { munge -n -S "$MUNGE_SOCK" 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }

ctld_up() {
    local pid
    # Fail fast (exit) if the daemon died instead of waiting for the timeout.
    if [[ -s $CTLD_PID ]] && ! pid=$(ctld_pid); then
        die "slurmctld exited during startup" "$CTLD_LOG"
    fi
    scontrol ping 2>/dev/null | grep -q 'is UP'
}

# node_state NAME -- the node's state as sinfo reports it.
node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null || true; }

nodes_idle() {
    local name state ok=0
    for name in "${NODE_NAMES[@]}"; do
        if [[ -s $(slurmd_pidfile "$name") ]] && ! slurmd_pid "$name" >/dev/null; then
            die "slurmd of node $name exited during startup" "$(slurmd_log "$name")"
        fi
        state=$(node_state "$name")
        [[ $state == idle ]] && continue
        ok=1
        # A node that comes up DOWN/DRAINED (e.g. after an unclean stop) is
        # resumed; harmless if the request is refused because it is already up.
        if [[ $state == down* || $state == drain* ]]; then
            scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
        fi
    done
    return $ok
}

# Running jobs make a node mixed/allocated, which is fine for reuse.
nodes_usable() {
    local name
    for name in "${NODE_NAMES[@]}"; do
        [[ $(node_state "$name") =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    done
}

scheduler_ran() {
    local n
    n=$(sdiag 2>/dev/null | awk '/Main schedule statistics/ {m = 1} m && /Total cycles:/ {print $3; exit}')
    ((${n:-0} > 0))
}

start() {
    local b
    for b in munged munge slurmctld slurmd scontrol sinfo sdiag sbatch srun; do
        command -v "$b" >/dev/null || die "'$b' not found; run: $0 install"
    done
    # Unix socket paths are limited to 108 bytes; slurmd puts
    # "<node>_<jobid>.<stepid>" sockets into its spool dir as well.
    ((${#STATE_DIR} <= 70)) || die "DSI_SLURM_DIR too long (${#STATE_DIR} > 70 chars): $STATE_DIR"

    if status >/dev/null 2>&1; then
        if config_current; then
            log "already running"
            if wait_until "$START_TIMEOUT" nodes_usable; then
                print_env
                return 0
            fi
            die "running, but not every node is usable: $(sinfo -h -N -o '%N %T %E' 2>&1)" "$CTLD_LOG"
        fi
        log "running with other settings (DSI_SLURM_*): restarting"
    fi
    # Partial or crashed previous run, or other settings: clean slate.
    stop
    local p name
    for p in "$CTLD_PORT" $(seq "$SLURMD_PORT" $((SLURMD_PORT + NODES - 1))); do
        ! port_busy "$p" || die "port $p is in use (another Slurm? set DSI_SLURM_CTLD_PORT/DSI_SLURM_SLURMD_PORT)"
    done

    write_config
    # Fresh cluster on every start: drop old job/node state and step sockets.
    rm -rf "${SPOOL:?}/ctld/"* "${SPOOL:?}"/d-*/*
    for p in "$CTLD_LOG" "$LOG"/slurmd*.log; do
        [[ -f $p ]] && mv -f "$p" "$p.prev"
    done
    rm -f "$CTLD_PID" "$RUN"/slurmd*.pid

    local t0=$SECONDS
    [[ ${DSI_SLURM_KEEP_ON_FAILURE:-0} == 1 ]] || CLEANUP_ON_FAILURE=1
    start_munged

    log "starting slurmctld"
    # -c: clear saved state. Both daemons daemonise themselves (no -D).
    slurmctld -f "$CONF" -c </dev/null >>"$CTLD_LOG" 2>&1 || die "slurmctld failed to start" "$CTLD_LOG"
    wait_until "$START_TIMEOUT" ctld_up || die "slurmctld not UP after ${START_TIMEOUT}s" "$CTLD_LOG"

    for name in "${NODE_NAMES[@]}"; do
        log "starting slurmd (node $name, $CPUS CPUs, $GPUS fake GPUs)"
        # -N: our node name regardless of what the hostname resolves to.
        slurmd -f "$CONF" -N "$name" </dev/null >>"$(slurmd_log "$name")" 2>&1 ||
            die "slurmd of node $name failed to start" "$(slurmd_log "$name")"
    done
    wait_until "$START_TIMEOUT" nodes_idle ||
        die "nodes not idle after ${START_TIMEOUT}s: $(sinfo -h -N -o '%N %T %E' 2>&1)" "$LOG"/slurmd-*.log "$CTLD_LOG"

    # slurmctld runs its first scheduling cycle ~3 s after it starts; a job
    # submitted before that sits PENDING until then. Wait, so that the
    # first job of a test starts as promptly as all later ones.
    wait_until "$START_TIMEOUT" scheduler_ran || die "slurmctld scheduler never ran" "$CTLD_LOG"

    CLEANUP_ON_FAILURE=0
    log "up in $((SECONDS - t0))s; state in $STATE_DIR"
    print_env
}

print_env() { echo "export SLURM_CONF=$CONF"; }

# ---------------------------------------------------------------- stop

# running_slurmds -- "NAME PID" for every slurmd of ours that runs, whatever
# DSI_SLURM_NODES says now (it may have changed since the start).
running_slurmds() {
    local f name pid
    for f in "$RUN"/slurmd*.pid; do
        [[ -e $f ]] || continue
        name=${f##*/slurmd-}
        name=${name%.pid}
        if pid=$(pid_of "$f" "$CONF"); then echo "$name $pid"; fi
    done
}

stop() {
    local pid ids name
    if pid=$(ctld_pid); then
        # Cancel jobs first so slurmstepd/job processes get cleaned up by Slurm.
        ids=$(squeue -h -o %A 2>/dev/null || true)
        if [[ -n $ids ]]; then
            log "cancelling jobs: ${ids//$'\n'/ }"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            wait_until "$STOP_TIMEOUT" no_jobs || log "jobs still listed after ${STOP_TIMEOUT}s; killing anyway"
        fi
    fi
    local daemons=()
    while read -r name pid; do
        daemons+=("slurmd($name):$pid")
    done < <(running_slurmds)
    if pid=$(ctld_pid); then daemons+=("slurmctld:$pid"); fi
    ((${#daemons[@]} == 0)) || terminate "${daemons[@]}"
    kill_leftover_steps
    # munged last: the Slurm daemons may still authenticate while shutting down.
    if pid=$(munged_pid); then terminate "munged:$pid"; fi
    rm -f "$CTLD_PID" "$RUN"/slurmd*.pid "$MUNGE_PID"
    return 0
}

no_jobs() { [[ -z $(squeue -h -o %A 2>/dev/null) ]]; }

# ---------------------------------------------------------------- status

# status -- 0 if munged, slurmctld and a slurmd per configured node run,
# 3 if none of ours runs, 1 otherwise.
status() {
    local up=0 pid name slurmds
    if pid=$(munged_pid); then echo "munged: running (pid $pid)"; up=$((up + 1)); else echo "munged: stopped"; fi
    if pid=$(ctld_pid); then echo "slurmctld: running (pid $pid)"; up=$((up + 1)); else echo "slurmctld: stopped"; fi
    slurmds=$(running_slurmds)
    for name in "${NODE_NAMES[@]}"; do
        if pid=$(awk -v n="$name" '$1 == n {print $2}' <<<"$slurmds") && [[ -n $pid ]]; then
            echo "slurmd $name: running (pid $pid)"
            up=$((up + 1))
        else
            echo "slurmd $name: stopped"
        fi
    done
    if ((up == NODES + 2)); then
        sinfo -N -o '%N %P %T %c %m %G' 2>&1 || true
        print_env
        return 0
    fi
    ((up == 0)) && [[ -z $slurmds ]] && return 3
    return 1
}

# ---------------------------------------------------------------- wait-job

# job_states JOBID -- one state per line: one for a plain job, one per task
# (or pending block of tasks) for a job array.
job_states() { scontrol show job -o "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }

job_done() {
    local states s
    states=$(job_states "$1")
    [[ -n $states ]] || return 1
    for s in $states; do
        case $s in
        PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | STAGE_OUT | SIGNALING | \
            REQUEUED | RESIZING | STOPPED) return 1 ;;
        esac
    done
}

wait_job() {
    local id=${1:?usage: wait-job JOBID [TIMEOUT]} timeout=${2:-300} states
    wait_until "$timeout" job_done "$id" ||
        die "job $id not finished after ${timeout}s (state: $(job_states "$id" | sort | uniq -c | xargs))"
    states=$(job_states "$id" | sort -u | xargs)
    log "job $id: $states"
    [[ $states == COMPLETED ]]
}

# ---------------------------------------------------------------- main

case ${1:-} in
install) install ;;
start) start ;;
stop) stop; log "stopped" ;;
restart) stop; start ;;
status) status ;;
env) print_env ;;
wait-job) shift; wait_job "$@" ;;
*)
    echo "usage: $0 {install|start|stop|restart|status|env|wait-job JOBID [TIMEOUT]}" >&2
    exit 2
    ;;
esac
