# Shared settings and helpers for start.sh and stop.sh (sourced, not run).
# The CI cluster's state (Slurm state, spool, MariaDB data, logs, pid files) lives under SLURM_CI_DIR.

export PATH=$PATH:/usr/sbin:/sbin
RUN=${SLURM_CI_DIR:-/var/tmp/semprior-slurm}
LOG=$RUN/log
CLUSTER=ci
NODE=$(hostname -s)
MUNGE_PID=/run/munge/munged.pid
T_START=$EPOCHREALTIME

# Daemons as name:pidfile, in start order (stop.sh goes in reverse).
DAEMONS=("munged:$MUNGE_PID" "mariadbd:$RUN/mysql.pid" "slurmdbd:$RUN/slurmdbd.pid"
         "slurmctld:$RUN/slurmctld.pid" "slurmd:$RUN/slurmd.pid")

# alive NAME PIDFILE: the pid in PIDFILE is a running NAME. A zombie (state Z) counts as exited: the
# daemons are reparented to PID 1, which reaps them only about a second after they exit.
alive() {
  local pid state
  pid=$(cat "$2" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 1
  state=$(sed -E 's/^.*\) (.).*$/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z ]]
}

# wait_for SECONDS COMMAND...: poll COMMAND every 0.1 s until it succeeds; fail after SECONDS.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

elapsed() { awk -v now="$EPOCHREALTIME" -v t0="$T_START" 'BEGIN { printf "%.1f s", now - t0 }'; }
