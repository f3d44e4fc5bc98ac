#!/bin/sh
# Install what the Slurm tests need (tests/slurm_cluster.py): slurmctld, slurmd, the client tools
# (sbatch, srun, squeue, scancel, scontrol, sinfo) and munge. Installs only; starts nothing: the
# fixture writes its own slurm.conf / munge key and starts its own daemons in a temporary directory.
# Idempotent: apt-get runs only when something is missing. Needs root for that (CI runs as root).
set -eu

missing=""
for b in slurmctld slurmd; do
    [ -x "/usr/sbin/$b" ] || missing="$missing slurm-wlm"
done
for b in sbatch srun squeue scancel scontrol sinfo; do
    command -v "$b" >/dev/null 2>&1 || missing="$missing slurm-wlm"
done
[ -x /usr/sbin/munged ] || missing="$missing munge"
command -v munge >/dev/null 2>&1 || missing="$missing munge"

if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup-slurm: need root to install:$missing" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d: the packages' postinst must not start the system's own munged/slurmd (101 = deny);
    # only if no policy exists already, and removed again afterwards.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        policy=1
    fi
    status=0
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $(echo $missing | tr ' ' '\n' | sort -u) >/dev/null || status=$?
    [ -z "$policy" ] || rm -f /usr/sbin/policy-rc.d
    [ "$status" -eq 0 ] || exit "$status"
fi

echo "setup-slurm: $(/usr/sbin/slurmctld -V 2>/dev/null || echo 'slurmctld missing'), munged=$(command -v /usr/sbin/munged || echo missing)"
