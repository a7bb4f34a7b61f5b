#!/usr/bin/env bash
# Stop the single-node CI SLURM started by scripts/slurm/start.sh: cancel all jobs, then stop slurmd,
# slurmctld, slurmdbd, MariaDB and munged. Idempotent. State in ${SLURM_CI_DIR:-/var/tmp/semprior-slurm} is
# kept (job ids and accounting carry on), unless --purge, which deletes it.
# Usage: bash scripts/slurm/stop.sh [--purge]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

purge=0
case "${1:-}" in
  "") ;;
  --purge) purge=1 ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac

no_jobs() { [[ -z $(squeue -h -o %A 2>/dev/null) ]]; }
dead() { ! alive "$@"; }

# cancel_jobs: scancel every job and wait (KillWait=5 s, then SIGKILL) until none is left running,
# so that no slurmstepd or job process outlives slurmd.
cancel_jobs() {
  local ids
  ids=$(squeue -h -o %A 2>/dev/null) || return 0
  [[ -n $ids ]] || return 0
  # shellcheck disable=SC2086  # one id per word
  scancel $ids 2>/dev/null || true
  wait_for 20 no_jobs || echo "slurm stop: warning: jobs still listed after 20 s" >&2
  cancelled=$(wc -w <<<"$ids")
}

# stop_daemon NAME PIDFILE: SIGTERM, then SIGKILL after 20 s (MariaDB flushes on SIGTERM).
stop_daemon() {
  alive "$1" "$2" || return 0
  local pid
  pid=$(cat "$2")
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_for 20 dead "$1" "$2"; then
    echo "slurm stop: $1 ($pid) ignored SIGTERM for 20 s, sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  stopped+=("$1")
}

cancelled=0
stopped=()
if [[ -d $RUN ]]; then
  exec 9<"$RUN"
  flock 9   # one start/stop at a time
fi
if alive slurmctld "$RUN/slurmctld.pid"; then
  cancel_jobs
fi
for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
  d=${DAEMONS[i]}
  stop_daemon "${d%%:*}" "${d#*:}"
done

if ((purge)); then
  [[ $RUN == /?* && $RUN != / ]] || { echo "slurm stop: refusing to purge '$RUN'" >&2; exit 1; }
  rm -rf -- "$RUN"
fi
note=$( ((purge)) && echo ", purged $RUN" || true)
if ((${#stopped[@]})); then
  echo "slurm stop: cancelled $cancelled job(s), stopped ${stopped[*]}$note ($(elapsed))"
else
  echo "slurm stop: nothing running$note ($(elapsed))"
fi
