#!/usr/bin/env bash
# Tests only: a real single-node Slurm on this machine (Debian's slurm-wlm + munge), so the
# Slurm tests submit real jobs. Never run this on a real cluster: it refuses to touch an
# /etc/slurm/slurm.conf it did not write.
#
#   tests/slurm/start_slurm.sh [start]   install if missing, configure, start, wait until idle
#   tests/slurm/start_slurm.sh stop      stop the daemons it started (by their pid files)
#   tests/slurm/start_slurm.sh status    exit 0 when the local Slurm answers
#
# Idempotent: `start` returns at once when the node already answers. Needs root (apt-get,
# daemons). Exit codes: 0 ok, 3 cannot run here (reason on stderr), 1 a step failed.
set -euo pipefail

MARKER="# titans-scale tests/slurm/start_slurm.sh"
CONF=/etc/slurm/slurm.conf
LOG_DIR=/var/log/slurm
RUN=/run/titans-slurm            # pid files of what this script started

cannot() { echo "start_slurm.sh: cannot start Slurm here: $*" >&2; exit 3; }

answers() {   # the controller answers and our node is usable
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state=$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n 1) || return 1
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

stop() {
    for name in slurmd slurmctld munged; do
        local pidfile="$RUN/$name.pid"
        [[ -f "$pidfile" ]] || continue
        local pid
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

install_packages() {
    command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || cannot "slurm-wlm/munge are not installed and there is no apt-get"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurm-wlm munge; } >"$LOG_DIR/apt.log" 2>&1; then
        cannot "apt-get install slurm-wlm munge failed (see $LOG_DIR/apt.log: $(tail -n 1 "$LOG_DIR/apt.log"))"
    fi
}

write_conf() {
    local host node_line mem_mb
    host=$(hostname -s)
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        cannot "$CONF exists and was not written by this script; not touching a real Slurm"
    fi
    # slurmd -C prints this machine's NodeName line; lower RealMemory so the node never drains
    # for "low RealMemory" when other processes hold memory.
    node_line=$(slurmd -C | head -n 1)
    mem_mb=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    node_line=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem_mb / 2))/" <<<"$node_line")
    mkdir -p /etc/slurm
    cat >"$CONF" <<EOF
$MARKER: a single-node test cluster.
ClusterName=titans-test
SlurmctldHost=$host
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# finished jobs stay visible to scontrol for 10 minutes (there is no accounting database)
MinJobAge=600
JobRequeue=1
KillWait=30
$node_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    if answers; then echo "start_slurm.sh: Slurm already answers"; return 0; fi
    [[ $(id -u) -eq 0 ]] || cannot "needs root (apt-get install slurm-wlm munge, start the daemons)"
    mkdir -p "$LOG_DIR" "$RUN" /var/spool/slurmctld /var/spool/slurmd
    install_packages
    write_conf
    stop   # leftovers of an earlier start that never answered

    # munge: a key (the package creates one) and its run directory
    [[ -f /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$RUN/munged.pid"

    slurmctld      # daemonises; writes $RUN/slurmctld.pid
    slurmd
    for _ in $(seq 60); do
        if answers; then echo "start_slurm.sh: Slurm is up ($(sinfo -h -N -o '%N %c CPUs %T'))"; return 0; fi
        # a node that registered as down (e.g. after an unclean restart) is put back in service
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "start_slurm.sh: Slurm did not come up; last log lines:" >&2
    tail -n 5 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    exit 1
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) answers ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
