# A multi-node SLURM on one machine for tests (bash; needs root, iproute2, util-linux, slurm-wlm,
# munge). Every node is a network namespace of its own, with its own eth0, address, hostname and
# /etc/hosts, and runs its own slurmd; a "head" namespace holds the bridge that joins them and runs
# slurmctld. Nothing is added to the machine's own network namespace, so traffic can only go to
# loopback or to the addresses made here. Ready in about 1.5 s.
#   source tests/slurm/multinode.sh
#   SLURM_DIR=$(mktemp -d) mn_up node01 node02 node03 && mn_client sbatch ...; mn_down
# Optional: MN_CPUS (CPUs each node offers SLURM; more than the machine has lets jobs share the
# cores), MN_CONF (lines appended to slurm.conf, e.g. more partitions), MN_SLURMD_TIMEOUT and
# MN_KILL_WAIT (seconds from a job's SIGTERM to its SIGKILL; SLURM's default is 30).
# mn_up exports SLURM_CONF, MN_ID, MN_HEAD (the head's namespace), MN_NODES (the node names in
# slurm.conf order; node i lives in namespace bsl${MN_ID}n$i) and MN_PIDS (munged, slurmctld and
# each slurmd: exactly what mn_down stops, with whatever still runs in the namespaces).
#
# What differs from a real cluster: one kernel, file system, clock and process table; one munged
# for all (its socket is a file, reachable from every namespace, where a real cluster runs one per
# node with a shared key); no cgroups (proctrack/linuxproc, task/none).

mn_namespaces() {  # the namespaces of cluster $MN_ID, head first
  local i
  echo "bsl${MN_ID}h"
  for i in $(seq "$(echo $MN_NODES | wc -w)"); do echo "bsl${MN_ID}n$i"; done
}

mn_up() {  # mn_up NAME...: one node per name, in this order in slurm.conf
  local dir=${SLURM_DIR:?SLURM_DIR must name an empty directory}
  [ $# -ge 1 ] || { echo "mn_up: name the nodes" >&2; return 1; }
  local id i name pid claimed=""
  chmod 755 "$dir"  # munged refuses a socket directory that is not world-executable
  mkdir -p "$dir/state" "$dir/log"
  # A /24 of 198.18.0.0/15 (RFC 2544: set aside for network tests) that no other cluster on this
  # machine holds; its number also names the namespaces and interfaces (Linux allows 15 chars).
  for id in $(shuf -i 0-255 -n 256); do
    ip netns add "bsl${id}h" 2>/dev/null && claimed=1 && break  # atomic: a second claimant fails
  done
  [ -n "$claimed" ] || { echo "mn_up: no free cluster number" >&2; return 1; }
  export MN_ID=$id MN_HEAD=bsl${id}h MN_NODES="$*" MN_PIDS=""
  ip -n "$MN_HEAD" link set lo up &&
    ip -n "$MN_HEAD" link add br0 type bridge &&
    ip -n "$MN_HEAD" addr add "198.18.$id.1/24" dev br0 &&
    ip -n "$MN_HEAD" link set br0 up || { mn_down; return 1; }
  # Every name resolves from the file and nothing asks a DNS server (mn_run mounts both files).
  # The IPv4-mapped forms are what the TCP store's IPv6 socket looks up.
  { echo "127.0.0.1 localhost"; echo "198.18.$id.1 head"; echo "::ffff:198.18.$id.1 head"; } > "$dir/hosts"
  printf '%s: files\n' passwd group shadow hosts networks protocols services ethers rpc netgroup > "$dir/nsswitch.conf"
  i=0
  for name in "$@"; do
    i=$((i + 1))
    local ns=bsl${id}n$i addr=198.18.$id.$((10 + i))
    { echo "$addr $name"; echo "::ffff:$addr $name"; } >> "$dir/hosts"
    # A veth pair: "eth0" inside the node, its peer on the head's bridge.
    ip netns add "$ns" &&
      ip link add "bsl${id}n${i}x" type veth peer name "bsl${id}n${i}y" &&
      ip link set "bsl${id}n${i}x" netns "$ns" &&
      ip link set "bsl${id}n${i}y" netns "$MN_HEAD" &&
      ip -n "$ns" link set "bsl${id}n${i}x" name eth0 &&
      ip -n "$ns" addr add "$addr/24" dev eth0 &&
      ip -n "$ns" link set eth0 up &&
      ip -n "$ns" link set lo up &&
      ip -n "$MN_HEAD" link set "bsl${id}n${i}y" master br0 &&
      ip -n "$MN_HEAD" link set "bsl${id}n${i}y" up || { mn_down; return 1; }
  done
  head -c 1024 /dev/urandom > "$dir/munge.key" && chmod 600 "$dir/munge.key"
  {
    cat <<CONF
ClusterName=bigssl-mn
SlurmctldHost=head(198.18.$id.1)
CommunicationParameters=NoCtldInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.sock,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdTimeout=${MN_SLURMD_TIMEOUT:-300}
KillWait=${MN_KILL_WAIT:-30}
MailProg=/bin/true
CONF
    # slurmd refuses to offer more CPUs than it finds, unless told to take the configured count.
    [ "${MN_CPUS:-$(nproc)}" -gt "$(nproc)" ] && echo "SlurmdParameters=config_overrides"
    i=0
    for name in "$@"; do
      i=$((i + 1))
      echo "NodeName=$name NodeAddr=198.18.$id.$((10 + i)) CPUs=${MN_CPUS:-$(nproc)} State=UNKNOWN"
    done
    echo "PartitionName=all Nodes=$(echo "$*" | tr ' ' ',') Default=YES MaxTime=INFINITE State=UP"
    [ -z "${MN_CONF:-}" ] || printf '%s\n' "$MN_CONF"
  } > "$dir/slurm.conf"
  export SLURM_CONF=$dir/slurm.conf
  /usr/sbin/munged -F --key-file="$dir/munge.key" --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
    --seed-file="$dir/munge.seed" --log-file="$dir/log/munged.log" --origin=127.0.0.1 >"$dir/log/munged.out" 2>&1 &
  MN_PIDS=$!; disown $!
  for i in $(seq 50); do munge -n -S "$dir/munge.sock" 2>/dev/null | unmunge -S "$dir/munge.sock" >/dev/null 2>&1 && break; sleep 0.1; done
  # nsenter, unshare, sh and the daemon replace one another (exec): $! is the daemon itself.
  mn_run "$MN_HEAD" head /usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
  MN_PIDS="$MN_PIDS $!"; disown $!
  for i in $(seq $#); do mn_slurmd "$i"; done
  for i in $(seq 150); do
    for pid in $MN_PIDS; do kill -0 "$pid" 2>/dev/null || break 2; done  # a daemon died: stop waiting
    [ "$(mn_client sinfo -h -N -p all -o %t 2>/dev/null | grep -c '^idle')" = $# ] && return 0
    sleep 0.2
  done
  echo "mn_up: the cluster did not become ready; logs:" >&2; tail -n 15 "$dir"/log/* >&2; mn_down; return 1
}

mn_slurmd() {  # mn_slurmd I: start the slurmd of node I (from 1), in its namespace; adds it to MN_PIDS
  local name
  name=$(echo $MN_NODES | cut -d' ' -f"$1")
  mkdir -p "$SLURM_DIR/spool/$name"
  mn_run "bsl${MN_ID}n$1" "$name" /usr/sbin/slurmd -D -N "$name" -f "$SLURM_CONF" \
    >>"$SLURM_DIR/log/slurmd-$name.out" 2>&1 &
  MN_PIDS="$MN_PIDS $!"; disown $!
}

mn_run() {  # mn_run NAMESPACE HOSTNAME COMMAND...: COMMAND as a process of that node (replaces this shell)
  # nsenter rather than `ip netns exec`, which remounts /sys and so hides the cgroup mounts slurmd
  # wants. Private mount and UTS namespaces give the node its own /etc/hosts and hostname.
  exec nsenter --net="/run/netns/$1" unshare --mount --uts --propagation private \
    sh -c 'mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/nsswitch.conf" /etc/nsswitch.conf &&
      hostname "$2" && shift 2 && exec "$@"' mn_run "$SLURM_DIR" "$2" "${@:3}"
}

mn_client() {  # a SLURM client (sbatch, scontrol, squeue...) run on the head
  nsenter --net="/run/netns/$MN_HEAD" "$@"
}

mn_down() {  # cancel what is left, stop exactly our daemons, then what still runs in our namespaces
  [ -n "${MN_ID:-}" ] || return 0
  local i p ns
  set -- $MN_PIDS  # munged slurmctld slurmd...
  if [ $# -ge 2 ] && kill -0 "$2" 2>/dev/null; then  # our slurmctld: only it knows our jobs
    mn_client squeue -h -o %i 2>/dev/null | xargs -r nsenter --net="/run/netns/$MN_HEAD" scancel 2>/dev/null || true
    for i in $(seq 50); do mn_client squeue -h 2>/dev/null | grep -q . || break; sleep 0.2; done
  fi
  # All at once (each takes a second or two to save its state and leave), then wait for each.
  for p in $MN_PIDS; do kill "$p" 2>/dev/null || true; done
  for p in $MN_PIDS; do
    for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  # Whatever still runs inside a namespace made here was started by this cluster (a slurmstepd
  # of a cancelled job, a rank): end it by pid, then remove the namespaces with their interfaces.
  for ns in $(mn_namespaces); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
  for ns in $(mn_namespaces); do
    for i in $(seq 50); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.1; done
    ip netns del "$ns" 2>/dev/null || true
  done
  MN_PIDS="" MN_ID=""
}
