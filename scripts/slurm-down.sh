#!/usr/bin/env bash
# Stop the daemons that scripts/slurm-up.sh started under DIR, by their PID files only, in the order
# slurmd (every node), slurmctld, munged: munged must outlive the Slurm daemons, which authenticate
# through it while they shut down. Safe to run twice, or on a folder where nothing runs.
#   bash scripts/slurm-down.sh DIR
D=${1:?usage: $0 DIR}
stop() {  # $1 = pid file: SIGTERM, up to 10 s to exit, then SIGKILL
  [ -f "$1" ] || return 0
  local p; p=$(cat "$1")
  if kill "$p" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p"
  fi
  rm -f "$1"
}
for pid_file in "$D"/slurmd-*.pid; do stop "$pid_file"; done
stop "$D/slurmctld.pid"
stop "$D/munge/munged.pid"
exit 0
