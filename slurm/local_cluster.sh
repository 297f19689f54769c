#!/usr/bin/env bash
# A single-node SLURM cluster on this Debian machine, for tests and for trying the sweeps without a cluster:
# munge, MariaDB + slurmdbd (accounting, so that sacct works and submitit sees cancelled and requeued jobs),
# slurmctld and slurmd, one node "localhost" with this machine's cores, one partition "debug".
#
#   slurm/local_cluster.sh start    install what is missing (apt, root), start what is not running; idempotent
#   slurm/local_cluster.sh status   what runs, and the node as sinfo sees it; exit 0 only when the node is up
#   slurm/local_cluster.sh stop     stop the daemons this script started, and nothing else
#
# Everything lives in $EOPT_SLURM_DIR (default /tmp/eopt-slurm): configs, state, logs, the database, and one pid
# file per daemon the script started. Clients find the config through SLURM_CONF=$EOPT_SLURM_DIR/slurm.conf (and
# through /etc/slurm/slurm.conf, linked there when the machine has none). Needs root and no systemd.
set -euo pipefail

DIR=${EOPT_SLURM_DIR:-/tmp/eopt-slurm}
DB_PORT=${EOPT_SLURM_DB_PORT:-3307}
export SLURM_CONF=$DIR/slurm.conf
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)

log() { echo "local_cluster: $*" >&2; }
die() {
	echo "error: local_cluster: $*" >&2
	exit 1
}

# A daemon is alive when its pid file names a process that is not a zombie. (PID 1 in a container reaps late,
# so pgrep and kill -0 would still see a dead daemon.)
# munged and mariadbd run as their own users and check who owns their directories: they get their own.
pidfile() {
	case $1 in
	munged) echo /run/munge/munged.pid ;;
	mariadb) echo "$DIR/mysql-run/mariadb.pid" ;;
	*) echo "$DIR/run/$1.pid" ;;
	esac
}

alive() {
	local pidfile=$1 pid state
	pid=$(cat "$pidfile" 2>/dev/null) || return 1  # a daemon may remove its pid file as it exits
	[ -n "$pid" ] || return 1
	[ -r "/proc/$pid/stat" ] || return 1
	state=$(sed 's/^.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
	[ "$state" != Z ] && [ "$state" != X ]
}

wait_for() {
	local what=$1 seconds=$2
	shift 2
	for _ in $(seq $((seconds * 10))); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.1
	done
	die "$what did not come up in ${seconds}s (logs in $DIR/log and $DIR/mysql-run)"
}

install() {
	local missing=()
	for cmd in munged slurmctld slurmd slurmdbd sbatch mariadbd; do
		command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: run as root to apt-get install ${PACKAGES[*]}"
	command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM, munge and MariaDB"
	log "installing ${PACKAGES[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$DIR/log/apt.log" 2>&1 ||
		{ apt-get update -q >>"$DIR/log/apt.log" 2>&1 &&
			apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$DIR/log/apt.log" 2>&1; } ||
		die "apt-get install failed (see $DIR/log/apt.log)"
}

write_configs() {
	local cpus mem password
	cpus=$(nproc)
	mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
	[ -s "$DIR/db_password" ] || (umask 077 && head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/db_password")
	password=$(cat "$DIR/db_password")
	cat >"$DIR/slurm.conf" <<EOF
ClusterName=eopt
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=300
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
	(
		umask 077
		cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=cred_expire=10
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
EOF
	)
	if [ ! -e /etc/slurm/slurm.conf ]; then
		mkdir -p /etc/slurm
		ln -s "$DIR/slurm.conf" /etc/slurm/slurm.conf
		echo /etc/slurm/slurm.conf >"$DIR/linked"
	fi
}

start_munge() {
	if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null >/dev/null 2>&1; then return 0; fi
	[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
	chown munge:munge /etc/munge/munge.key
	chmod 400 /etc/munge/munge.key
	mkdir -p /run/munge /var/lib/munge /var/log/munge
	chown munge:munge /run/munge /var/lib/munge /var/log/munge
	# munged checks the ownership of its directories: it keeps its own pid and log paths
	runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 || die "munged did not start (see /var/log/munge/munged.log)"
	echo munged >>"$DIR/started"
	wait_for munged 10 sh -c 'munge -n </dev/null | unmunge'
}

start_mariadb() {
	alive "$(pidfile mariadb)" && return 0
	local password
	password=$(cat "$DIR/db_password")
	mkdir -p "$DIR/mysql" "$DIR/mysql-run"
	chown mysql:mysql "$DIR/mysql" "$DIR/mysql-run"
	if [ ! -d "$DIR/mysql/mysql" ]; then
		mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
			>"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
	fi
	setsid mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" --socket="$DIR/mysql-run/mariadb.sock" \
		--pid-file="$(pidfile mariadb)" --bind-address=127.0.0.1 --port="$DB_PORT" \
		--log-error="$DIR/mysql-run/mariadb.log" --innodb-buffer-pool-size=32M </dev/null >/dev/null 2>&1 &
	echo mariadb >>"$DIR/started"
	wait_for mariadb 60 mariadb --no-defaults -S "$DIR/mysql-run/mariadb.sock" -u root -e "SELECT 1"
	mariadb --no-defaults -S "$DIR/mysql-run/mariadb.sock" -u root <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_daemon() { # name, readiness probe..., then: -- command...
	local name=$1
	shift
	local probe=()
	while [ "$1" != -- ]; do
		probe+=("$1")
		shift
	done
	shift
	alive "$DIR/run/$name.pid" && return 0
	setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
	echo "$name" >>"$DIR/started"
	wait_for "$name" 60 "${probe[@]}"
}

start() {
	mkdir -p "$DIR"/{state,spool,run,log}
	install
	write_configs
	start_munge
	start_mariadb
	start_daemon slurmdbd sacctmgr -n list cluster -- slurmdbd -D
	sacctmgr -i -Q add cluster eopt >/dev/null 2>&1 || true
	start_daemon slurmctld scontrol ping -- slurmctld -D -i
	start_daemon slurmd sh -c 'sinfo -h -N -o %t | grep -qE "^(idle|mix|alloc)"' -- slurmd -D -N localhost
	log "up: export SLURM_CONF=$SLURM_CONF (sinfo, sbatch, srun, sacct)"
}

# Stop the daemons in the reverse order of their start, each only if this script started it.
stop() {
	[ -f "$DIR/started" ] || {
		log "nothing was started by this script"
		return 0
	}
	for name in $(tac "$DIR/started"); do
		local pidfile
		pidfile=$(pidfile "$name")
		if alive "$pidfile"; then
			kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
			for _ in $(seq 100); do
				alive "$pidfile" || break
				sleep 0.1
			done
			alive "$pidfile" && kill -KILL "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
		fi
		rm -f "$pidfile"
	done
	rm -f "$DIR/started"
	if [ -f "$DIR/linked" ]; then
		rm -f "$(cat "$DIR/linked")" "$DIR/linked"
	fi
	log "stopped"
}

status() {
	local up=0
	for name in munged mariadb slurmdbd slurmctld slurmd; do
		if alive "$(pidfile "$name")"; then echo "$name: running (pid $(cat "$(pidfile "$name")"))"; else
			echo "$name: not running"
			up=1
		fi
	done
	if [ -f "$DIR/slurm.conf" ] && command -v sinfo >/dev/null; then sinfo -N 2>/dev/null || up=1; fi
	return $up
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*) die "usage: $0 start|stop|status" ;;
esac
