#!/usr/bin/env bash
# A real one-node Slurm on this machine, for tests/test_slurm.py and CI: munge, MariaDB, slurmdbd (so that sacct
# answers, as the executor plugin needs), slurmctld and slurmd from Debian's packages, started as plain daemons (no
# systemd), with memory limits enforced. Run it again at any time: it starts what is not running and checks again.
#
#   bash tests/slurm/cluster.sh        bring the cluster up; exit 0 once a job ran and --mem was enforced
#   bash tests/slurm/cluster.sh stop   stop the daemons
#
# Exit 77 (skip) where it cannot work at all: not root, or no apt-get. Any other failure is an error.
set -euo pipefail
export LC_ALL=C

say() { echo "slurm-cluster: $*"; }
fail() { echo "slurm-cluster: FAILED: $*" >&2; exit 1; }
skip() { echo "slurm-cluster: SKIPPED: $*" >&2; exit 77; }

ACCOUNT=diffattr PARTITION=main CLUSTER=diffattr
ETC=/etc/slurm RUN=/run/slurm STATE=/var/lib/slurm LOGS=/var/log/slurm
HOST=$(hostname -s)

pid_alive() { [[ -s $1 ]] && kill -0 "$(tr -dc 0-9 <"$1")" 2>/dev/null; }
stop_one() {  # stop_one PIDFILE: TERM the daemon and wait for it to go
    local pid i
    pid_alive "$1" || return 0
    pid=$(tr -dc 0-9 <"$1")
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    fail "daemon $pid ($1) did not stop"
}
stop_all() {
    stop_one $RUN/slurmd.pid; stop_one $RUN/slurmctld.pid; stop_one $RUN/slurmdbd.pid
    stop_one /run/mysqld/mysqld.pid; stop_one /run/munge/munged.pid
}
retry() {  # retry SECONDS COMMAND...: until it succeeds
    local i
    for ((i = 0; i < $1 * 2; i++)); do "${@:2}" >/dev/null 2>&1 && return 0; sleep 0.5; done
    return 1
}

[[ $(id -u) == 0 ]] || skip "needs root (daemons, /etc/slurm)"
if [[ ${1:-} == stop ]]; then stop_all; say "stopped"; exit 0; fi
command -v apt-get >/dev/null || skip "needs apt-get to install Debian's slurm packages"

# 1. Packages. policy-rc.d keeps their install scripts from starting daemons that are not configured yet.
packages=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || fail "apt-get update"
    apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "${missing[@]}" >/dev/null ||
        fail "apt-get install ${missing[*]}"
fi

# 2. Configuration. The node is what slurmd sees, less 10% of its memory (at least 1 GiB) kept for the system.
read -r cpus mem < <(slurmd -C | head -1 | tr ' ' '\n' |
    awk -F= '$1 == "CPUs" {c = $2} $1 == "RealMemory" {m = $2} END {print c, m}')
mem=$((mem - (mem / 10 > 1024 ? mem / 10 : 1024)))
# Memory is enforced by cgroups where this machine lets Slurm create them (v1 or v2), else by the accounting
# poller, which kills a job over its --mem within a couple of seconds.
enforce=poll
if [[ $(stat -fc %T /sys/fs/cgroup) == cgroup2fs ]]; then
    grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null && mkdir /sys/fs/cgroup/diffattr-probe 2>/dev/null &&
        rmdir /sys/fs/cgroup/diffattr-probe && enforce=cgroup/v2
elif mkdir /sys/fs/cgroup/memory/diffattr-probe 2>/dev/null; then
    rmdir /sys/fs/cgroup/memory/diffattr-probe && enforce=cgroup/v1
fi
if [[ $enforce == cgroup/* ]]; then
    plugins="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
JobAcctGatherType=jobacct_gather/cgroup"
else
    plugins="ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherParams=OverMemoryKill"
fi
install -d -o slurm -g slurm $RUN $LOGS $STATE $STATE/ctld
install -d $STATE/d $ETC
cat >$ETC/slurm.conf.new <<EOF
# written by tests/slurm/cluster.sh (diffattr): one node, $enforce memory enforcement
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
MailProg=/bin/true
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
$plugins
JobAcctGatherFrequency=task=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
AccountingStoreFlags=job_comment
MinJobAge=300
KillWait=10
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
cmp -s $ETC/slurm.conf.new $ETC/slurm.conf || { mv $ETC/slurm.conf.new $ETC/slurm.conf; changed=1; }
rm -f $ETC/slurm.conf.new
if [[ $enforce == cgroup/* ]]; then
    cat >$ETC/cgroup.conf <<EOF
CgroupPlugin=${enforce}
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
$([[ $enforce == cgroup/v2 ]] && echo IgnoreSystemd=yes)
EOF
fi
if ! grep -q '^StoragePass=' $ETC/slurmdbd.conf 2>/dev/null; then
    cat >$ETC/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=$LOGS/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
StorageLoc=slurm_acct_db
EOF
fi
chown slurm:slurm $ETC/slurmdbd.conf && chmod 600 $ETC/slurmdbd.conf

# 3. Daemons, each only when it is not running already.
install -d -o munge -g munge /run/munge /var/lib/munge /var/log/munge
[[ -s /etc/munge/munge.key ]] || { head -c 1024 /dev/urandom >/etc/munge/munge.key; changed=1; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force || fail "munged (see /var/log/munge/munged.log)"
    retry 15 sh -c 'munge -n | unmunge' || fail "munge credentials do not verify"
fi
if ! mariadb-admin ping >/dev/null 2>&1; then
    install -d -o mysql -g mysql /run/mysqld
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null || fail "mariadb-install-db"
    setsid mysqld_safe --skip-syslog </dev/null >/dev/null 2>&1 &
    retry 60 mariadb-admin ping || fail "MariaDB does not answer (see /var/log/mysql/error.log)"
fi
pass=$(sed -n 's/^StoragePass=//p' $ETC/slurmdbd.conf)
mariadb -u root -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost'; ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || fail "the slurm database user"
if ! pid_alive $RUN/slurmdbd.pid; then
    slurmdbd || fail "slurmdbd (see $LOGS/slurmdbd.log)"
fi
retry 60 sacctmgr -n list cluster || fail "slurmdbd does not answer (see $LOGS/slurmdbd.log)"
sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER || sacctmgr -i add cluster $CLUSTER >/dev/null
sacctmgr -n -P list account format=account | grep -qx $ACCOUNT ||
    sacctmgr -i add account $ACCOUNT cluster=$CLUSTER >/dev/null
sacctmgr -n -P list association user=root account=$ACCOUNT format=user | grep -qx root ||
    sacctmgr -i add user root account=$ACCOUNT cluster=$CLUSTER defaultaccount=$ACCOUNT >/dev/null
if ((changed)); then stop_one $RUN/slurmd.pid; stop_one $RUN/slurmctld.pid; fi
if ! pid_alive $RUN/slurmctld.pid; then
    # controller state of another cluster name (an earlier setup of this machine) would stop slurmctld
    [[ -r $STATE/ctld/clustername && $(cat $STATE/ctld/clustername) != "$CLUSTER" ]] && rm -rf "${STATE:?}/ctld/"*
    slurmctld || fail "slurmctld (see $LOGS/slurmctld.log)"
fi
retry 60 sh -c 'scontrol ping | grep -q UP' || fail "slurmctld does not answer (see $LOGS/slurmctld.log)"
pid_alive $RUN/slurmd.pid || slurmd || fail "slurmd (see $LOGS/slurmd.log)"
node_ready() { sinfo -h -n "$HOST" -o %T | grep -Eq '^(idle|mixed|allocated)'; }
if ! retry 20 node_ready; then
    scontrol update nodename="$HOST" state=resume 2>/dev/null || true
    retry 40 node_ready || fail "node $HOST is $(sinfo -h -n "$HOST" -o '%T: %E')"
fi

# 4. Checks: a job runs and is accounted; a job over its --mem is killed.
check=$(mktemp -d) && chmod 755 "$check"
job() { timeout 120 sbatch --parsable --wait -D "$check" -o "$check/%j.out" -t 2 "$@" 2>"$check/err"; }
id=$(job --wrap true) || fail "a job did not run: $(tail -1 "$check/err")"
retry 30 sh -c "sacct -n -X -j $id -o state | grep -q COMPLETED" || fail "job $id is not COMPLETED in sacct"
if id=$(job --mem=100M --wrap "python3 -c 'b = bytearray(500 << 20); import time; time.sleep(15)'"); then
    fail "job $id held 500 MB under --mem=100M and was not killed"
fi
rm -rf "$check"
echo "slurm-cluster: up: node $HOST, $cpus CPUs, $mem MB, partition $PARTITION, account $ACCOUNT, memory: $enforce"
