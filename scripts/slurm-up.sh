#!/usr/bin/env bash
# Start a throw-away Slurm (Debian's slurm-wlm + munge) whose every file lives under the folder DIR.
#
#   bash scripts/slurm-up.sh DIR      # installs slurm-wlm and munge with apt-get when missing (root)
#   export SLURM_CONF=DIR/slurm.conf  # then sbatch / srun / squeue talk to it
#   bash scripts/slurm-down.sh DIR    # stops slurmd, slurmctld, munged (in that order)
#
# For tests, and for trying the sbatch scripts of slurm/ on one machine; a real cluster has its own.
# Settings (environment):
#   SLURM_LOCAL_CPUS=8        CPUs each node advertises: more than a small machine has, so that
#                             `srun -n 4` needs no --overcommit
#   SLURM_PLACEHOLDER_GPUS=0  GPUs each node declares; their device files are copies of /dev/null,
#                             so that jobs asking --gpus-per-node are accepted and their tasks get
#                             CUDA_VISIBLE_DEVICES as on a GPU node. Nothing can compute on them.
#   SLURM_NODES="localhost=127.0.0.1"  the nodes, NAME=ADDRESS separated by spaces; the first one
#                             also runs slurmctld
#   SLURM_NODE_EXEC=""        a command that runs its arguments on a node: `$SLURM_NODE_EXEC NAME
#                             CMD...` (e.g. a script entering that node's network namespace); empty:
#                             run here. The readiness check runs sinfo through it on the first node.
#   SLURMCTLD_PORT=6817 SLURMD_PORT=6818
#   SLURM_CGROUP_PLUGIN=""    cgroup/v1 or cgroup/v2 writes a cgroup.conf naming it; empty: slurmd
#                             detects the cgroup version from /sys/fs/cgroup (which the fresh /sys
#                             of `ip netns exec` lacks)
#   SLURM_FIRST_JOB_ID        the first job id (default: one that differs at each start). MPICH names
#                             its shared-memory segments after the PMI job id ("<job>.<step>"), and a
#                             segment that a killed job left in /dev/shm breaks MPI_Init of the next
#                             job with that id, which another throw-away cluster would reuse.
# KillWait is 5 s, so that scancel ends a job within seconds.
# Exit status: 0 up; 3 cannot install slurm-wlm/munge (no apt-get, not root, or apt-get failed);
# 1 any other failure (see DIR/log).
set -euo pipefail
D=${1:?usage: $0 DIR}
NCPU=${SLURM_LOCAL_CPUS:-8}
NGPU=${SLURM_PLACEHOLDER_GPUS:-0}
NODES=${SLURM_NODES:-localhost=127.0.0.1}
read -r -a NODE_EXEC <<< "${SLURM_NODE_EXEC:-}"
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
FIRST_JOB_ID=${SLURM_FIRST_JOB_ID:-$(( ($(date +%s%N) / 1000) % 60000000 + 1 ))}  # below Slurm's 67108863

unavailable() { echo "slurm-up: $*" >&2; exit 3; }

install_packages() {
  [ "$(id -u)" = 0 ] || unavailable "slurm-wlm/munge are missing and installing them needs root"
  command -v apt-get >/dev/null || unavailable "slurm-wlm/munge are missing and there is no apt-get"
  local log; log=$(mktemp)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends slurm-wlm munge; } >"$log" 2>&1; then
    echo "slurm-up: apt-get could not install slurm-wlm munge:" >&2; tail -n 20 "$log" >&2; rm -f "$log"; exit 3
  fi
  rm -f "$log"
}

on_node() {  # $1 = node name, then the command
  local node=$1; shift
  "${NODE_EXEC[@]}" ${NODE_EXEC:+"$node"} "$@"
}

for tool in slurmctld slurmd munged mungekey sinfo; do
  command -v "$tool" >/dev/null || { install_packages; break; }
done
[ "$(id -u)" = 0 ] || unavailable "the daemons run as root (SlurmUser=root); run as root"

mkdir -p "$D"/{munge,state,log}
D=$(cd "$D" && pwd)
# munged refuses a socket below a folder that others cannot enter (pytest's tmp_path is one).
for dir in $(dirname "$D") $(p=$(dirname "$D"); while [ "$p" != / ]; do p=$(dirname "$p"); echo "$p"; done); do
  [ "$(( 0$(stat -c %a "$dir") & 01 ))" = 1 ] || {
    echo "slurm-up: munged needs every folder above $D to be o+x, and $dir is not; use a folder under /tmp" >&2
    exit 1; }
done
chmod 755 "$D"                  # munged: every folder above its socket needs o+x (mktemp -d gives 0700)
chmod 711 "$D/munge"            # munged: the socket's folder must be o+x
[ -f "$D/munge/munge.key" ] || mungekey --create --keyfile="$D/munge/munge.key"

gres_types="" node_gres=""
if (( NGPU > 0 )); then
  mkdir -p "$D/dev"
  for ((i = 0; i < NGPU; i++)); do  # slurmd wants character devices: 1,3 is /dev/null
    [ -e "$D/dev/gpu$i" ] || mknod "$D/dev/gpu$i" c 1 3
  done
  echo "Name=gpu File=$D/dev/gpu[0-$((NGPU - 1))]" > "$D/gres.conf"
  gres_types="GresTypes=gpu" node_gres="Gres=gpu:$NGPU"
fi

if [ -n "${SLURM_CGROUP_PLUGIN:-}" ]; then
  echo "CgroupPlugin=$SLURM_CGROUP_PLUGIN" > "$D/cgroup.conf"
fi

node_names=() node_lines=""
for entry in $NODES; do
  name=${entry%%=*} addr=${entry#*=}
  node_names+=("$name")
  mkdir -p "$D/spool/$name"
  node_lines+="NodeName=$name NodeAddr=$addr CPUs=$NCPU $node_gres RealMemory=16000 State=UNKNOWN"$'\n'
done
head_entry=${NODES%% *}
head=${head_entry%%=*} head_addr=${head_entry#*=}

cat > "$D/slurm.conf" <<CONF
ClusterName=local
$gres_types
SlurmctldHost=$head($head_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket.2
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmi2
FirstJobId=$FIRST_JOB_ID
KillWait=5
ReturnToService=2
SlurmdParameters=config_overrides
${node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$D/slurm.conf"

munged --socket="$D/munge/munge.socket.2" --key-file="$D/munge/munge.key" \
       --pid-file="$D/munge/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
on_node "$head" slurmctld -f "$SLURM_CONF"
for name in "${node_names[@]}"; do
  on_node "$name" slurmd -f "$SLURM_CONF" -N "$name"
done

for _ in $(seq 150); do
  states=$(on_node "$head" sinfo -h -N -o %T 2>/dev/null || true)
  if [ "$(grep -c '^idle$' <<< "$states")" = "${#node_names[@]}" ]; then
    echo "slurm up in $D with ${#node_names[@]} node(s) (SLURM_CONF=$SLURM_CONF)"
    exit 0
  fi
  sleep 0.2
done
echo "slurm-up: the nodes did not all become idle within 30 s (states: ${states//$'\n'/ }); see $D/log" >&2
exit 1
