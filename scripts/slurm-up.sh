#!/usr/bin/env bash
# Bring up a real single-host Slurm cluster for the launcher tests (Debian 12, as root): munge, slurmctld
# and NODES slurmd daemons whose fake node names n1..nN all live on 127.0.0.1, in partition "debug".
# Idempotent: what already runs is left alone, so tests and CI can call it on a cluster that is up.
#   NODES=2 (default) bash scripts/slurm-up.sh        stop with: bash scripts/slurm-down.sh
# Adapted from shared/infra/slurm-up.sh (verified on this kind of machine); accounting is left out
# (nothing in dtrain or its tests needs sacct).
set -euo pipefail
NODES=${NODES:-2}
PKGS="munge slurmctld slurmd slurm-client"
if ! dpkg -s $PKGS >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
fi
[ -s /etc/munge/munge.key ] || mungekey --create
chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
pgrep -u munge -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
NAMES=$(seq -f 'n%g' 1 "$NODES" | tr '\n' ' ')
grep -q '# dtrain slurm-up fake nodes' /etc/hosts || echo "127.0.0.1 $NAMES # dtrain slurm-up fake nodes" >> /etc/hosts
conf=$(cat <<CONF
ClusterName=dtrain-test
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=n[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
CONF
)
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
  echo "$conf" > /etc/slurm/slurm.conf
  if pgrep -x slurmctld >/dev/null; then scontrol reconfigure; fi
fi
pgrep -x slurmctld >/dev/null || slurmctld
for n in $NAMES; do
  install -d "/var/lib/slurm/slurmd-$n"
  if ! { [ -s "/run/slurmd-$n.pid" ] && kill -0 "$(cat "/run/slurmd-$n.pid")" 2>/dev/null; }; then slurmd -N "$n"; fi
done
for _ in $(seq 150); do
  if [ "$(sinfo -h -o %t | sort -u)" = idle ]; then sinfo; exit 0; fi
  sleep 0.2
done
echo "slurm-up: nodes did not become idle within 30 s:" >&2; sinfo >&2 || true; exit 1
