#!/usr/bin/env bash
# Start a real single-node SLURM for tests and CI: munge, a private MariaDB (127.0.0.1:3307), slurmdbd,
# slurmctld and slurmd, all as root, without systemd or cgroups; partition `debug`, cluster `ci`.
# Installs the Debian packages when missing. Idempotent: when the cluster is already up with this config it
# only prints its status. State: ${SLURM_CI_DIR:-/var/tmp/semprior-slurm}. Stop: scripts/slurm/stop.sh.
# Recipe and pitfalls: slurm/README.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core)
BINARIES=(slurmctld slurmd sinfo sacctmgr munged slurmdbd mariadbd mariadb-install-db mariadb)
SQL=(mariadb --no-defaults --user=root --socket="$RUN/mysql.sock")

die() {
  echo "slurm start: FAILED: $*" >&2
  echo "slurm start: logs in $LOG/ (munge: /var/log/munge/munged.log)" >&2
  exit 1
}

# ---------------------------------------------------------------- packages and config
install_packages() {
  local b
  for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null || break
  done
  command -v "$b" >/dev/null && return 0
  echo "slurm start: installing ${PACKAGES[*]} (log: $LOG/apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  # "policy-rc.d denied execution of start" in the log is expected: everything is started by hand below.
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$LOG/apt.log" 2>&1 \
    || { apt-get update -q >>"$LOG/apt.log" 2>&1 \
         && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$LOG/apt.log" 2>&1; } \
    || die "apt-get install failed (see $LOG/apt.log)"
}

# render_config DIR: write slurm.conf and slurmdbd.conf for this machine into DIR.
render_config() {
  local hw mem key
  # `slurmd -C` prints e.g.
  # "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24099".
  hw=$(slurmd -C | head -n 1) || die "slurmd -C failed"
  mem=$(grep -oP 'RealMemory=\K[0-9]+' <<<"$hw") || die "no RealMemory in: $hw"
  hw=$(for key in CPUs Boards SocketsPerBoard CoresPerSocket ThreadsPerCore; do
         grep -oP "\b$key=[0-9]+" <<<"$hw"
       done | tr '\n' ' ')
  sed -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@NODE@|$NODE|g" -e "s|@RUN@|$RUN|g" \
      -e "s|@NODE_HW@|${hw% }|g" -e "s|@MEM_MB@|$((mem * 85 / 100))|g" \
      "$HERE/slurm.conf.in" >"$1/slurm.conf"
  cat >"$1/slurmdbd.conf" <<EOF
# slurmdbd.conf for the CI cluster, written by scripts/slurm/start.sh. Mode 600, owned by SlurmUser.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
EOF
}

config_current() {
  cmp -s "$RUN/conf/slurm.conf" /etc/slurm/slurm.conf && cmp -s "$RUN/conf/slurmdbd.conf" /etc/slurm/slurmdbd.conf
}

all_alive() {
  local d
  for d in "${DAEMONS[@]}"; do alive "${d%%:*}" "${d#*:}" || return 1; done
}

node_state() { sinfo -h -n "$NODE" -p debug -o %T 2>/dev/null; }
node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

# ---------------------------------------------------------------- daemons
start_munge() {
  if ! alive munged "$MUNGE_PID"; then
    if [[ ! -s /etc/munge/munge.key ]]; then
      mungekey --create --keyfile=/etc/munge/munge.key || die "mungekey --create failed"
      chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge   # no systemd-tmpfiles to create it
    runuser -u munge -- /usr/sbin/munged --force 9<&- || die "munged did not start"
  fi
  wait_for 10 bash -c 'munge -n | unmunge' || die "munge does not answer"
}

start_mariadb() {
  if ! alive mariadbd "$RUN/mysql.pid"; then
    if [[ ! -d $RUN/mysql/mysql ]]; then
      mariadb-install-db --no-defaults --datadir="$RUN/mysql" --user=root \
        --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    # --user=root is required for mariadbd to run as root. setsid: not tied to the caller's session.
    setsid mariadbd --no-defaults --user=root --datadir="$RUN/mysql" --socket="$RUN/mysql.sock" \
      --pid-file="$RUN/mysql.pid" --log-error="$LOG/mariadb.log" --port=3307 --bind-address=127.0.0.1 \
      --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 9<&- &
  fi
  wait_for 30 "${SQL[@]}" -e 'SELECT 1' || die "MariaDB does not answer on $RUN/mysql.sock"
  "${SQL[@]}" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "creating the accounting database failed"
}

start_slurmdbd() {
  alive slurmdbd "$RUN/slurmdbd.pid" || slurmdbd 9<&- || die "slurmdbd did not start"
  wait_for 30 sacctmgr -n -P list cluster format=cluster || die "slurmdbd does not answer"
  # The cluster must exist in the database before slurmctld starts.
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" \
    || sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
}

start_slurmctld() {
  alive slurmctld "$RUN/slurmctld.pid" || slurmctld 9<&- || die "slurmctld did not start"
  wait_for 30 bash -c 'scontrol ping | grep -q "is UP"' || die "slurmctld does not answer scontrol ping"
}

# After a restart slurmctld restores the node as idle from its saved state before slurmd has registered,
# so wait until slurmd's registration (SlurmdStartTime) is at least its launch time.
slurmd_registered() {
  local t
  t=$(scontrol -o show node "$NODE" | grep -oP 'SlurmdStartTime=\K\S+') || return 1
  [[ $t != None ]] && (($(date -d "$t" +%s) >= $1))
}

start_slurmd() {
  local launched=0
  if ! alive slurmd "$RUN/slurmd.pid"; then
    launched=$(date +%s)
    slurmd -N "$NODE" 9<&- || die "slurmd did not start"
  fi
  wait_for 30 slurmd_registered "$launched" || die "slurmd did not register with slurmctld"
  if [[ $(node_state) =~ ^(down|drain|drained|draining) ]]; then   # e.g. left down by an earlier crash
    scontrol update nodename="$NODE" state=resume || true
  fi
  wait_for 30 node_usable || die "node $NODE is '$(node_state)', not idle"
}

# ---------------------------------------------------------------- main
mkdir -p "$RUN/conf" "$RUN/state" "$RUN/spool" "$LOG"
exec 9<"$RUN"
flock 9   # one start/stop at a time; daemons are started with fd 9 closed so they do not hold it
install_packages
render_config "$RUN/conf"

if all_alive && config_current && node_usable; then
  echo "slurm: cluster $CLUSTER already up: node $NODE $(node_state), partition debug," \
    "state in $RUN ($(elapsed))"
  exit 0
fi
if ! config_current && { alive slurmctld "$RUN/slurmctld.pid" || alive slurmd "$RUN/slurmd.pid"; }; then
  echo "slurm start: config changed, restarting the cluster"
  flock -u 9
  bash "$HERE/stop.sh"
  flock 9
fi

# A live (not zombie) slurmctld that is not ours: the ports and /etc/slurm are taken.
if ! alive slurmctld "$RUN/slurmctld.pid" && ps -C slurmctld -o stat= | grep -qv '^Z'; then
  die "a slurmctld not started from $RUN is running (another SLURM_CI_DIR?); stop it with its own stop.sh"
fi
getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts
install -d /etc/slurm
install -m 644 "$RUN/conf/slurm.conf" /etc/slurm/slurm.conf
install -m 600 -o root "$RUN/conf/slurmdbd.conf" /etc/slurm/slurmdbd.conf

start_munge
start_mariadb
start_slurmdbd
start_slurmctld
start_slurmd
cpus=$(grep -oP '\bCPUs=\K\d+' /etc/slurm/slurm.conf)
mem_mb=$(grep -oP 'RealMemory=\K\d+' /etc/slurm/slurm.conf)
echo "slurm: cluster $CLUSTER up: node $NODE $(node_state) ($cpus CPUs, $mem_mb MB), partition debug," \
  "accounting on, state in $RUN, logs in $LOG ($(elapsed))"
