# A single-node SLURM on 127.0.0.1 for tests (munged + slurmctld + slurmd as root, all state in
# $SLURM_DIR). Measured on the CI machines: ready in about 1 s.
#   source tests/slurm/cluster.sh; slurm_up && echo "$SLURM_CONF $SLURM_PIDS"; ...; slurm_down
slurm_up() {
  local dir=${SLURM_DIR:?SLURM_DIR must name an empty directory}
  chmod 755 "$dir"  # munged refuses a socket directory that is not world-executable
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  head -c 1024 /dev/urandom > "$dir/munge.key" && chmod 600 "$dir/munge.key"
  cat > "$dir/slurm.conf" <<CONF
ClusterName=bigssl-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.sock,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$dir/slurm.conf
  /usr/sbin/munged -F --key-file="$dir/munge.key" --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
    --seed-file="$dir/munge.seed" --log-file="$dir/log/munged.log" --origin=127.0.0.1 >"$dir/log/munged.out" 2>&1 &
  SLURM_PIDS=$!; disown $!
  local i p
  for i in $(seq 50); do munge -n -S "$dir/munge.sock" 2>/dev/null | unmunge -S "$dir/munge.sock" >/dev/null 2>&1 && break; sleep 0.1; done
  /usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
  SLURM_PIDS="$SLURM_PIDS $!"; disown $!
  /usr/sbin/slurmd -D -N localhost -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 &
  SLURM_PIDS="$SLURM_PIDS $!"; disown $!
  export SLURM_PIDS
  for i in $(seq 150); do
    for p in $SLURM_PIDS; do kill -0 "$p" 2>/dev/null || break 2; done  # a daemon died: stop waiting
    [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && return 0
    sleep 0.2
  done
  echo "slurm_up: the cluster did not become ready; logs:" >&2; tail -n 15 "$dir"/log/* >&2; slurm_down; return 1
}

slurm_down() {  # cancel what is left, then stop exactly our daemons, newest first
  [ -n "${SLURM_PIDS:-}" ] || return 0
  local i p
  squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
  for p in $(echo $SLURM_PIDS | tr ' ' '\n' | tac); do
    kill "$p" 2>/dev/null || true
    for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  SLURM_PIDS=
}
