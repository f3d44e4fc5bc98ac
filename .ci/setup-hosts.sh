#!/bin/sh
# Install what the host-level tests need (tests/hosts.py): an sshd binary and iproute2 (`ip netns`).
# Idempotent: installs only what is missing. Needs root (CI runs as root).
set -eu

missing=""
[ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
command -v ssh >/dev/null 2>&1 || missing="$missing openssh-client"
command -v ssh-keygen >/dev/null 2>&1 || missing="$missing openssh-client"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v rsync >/dev/null 2>&1 || missing="$missing rsync"  # shared_fs: false (tests/test_ssh_noshare.py)
command -v tmux >/dev/null 2>&1 || missing="$missing tmux"  # tests/test_ui_tmux.py

if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup-hosts: need root to install:$missing" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $(echo $missing | tr ' ' '\n' | sort -u) >/dev/null
fi

# sshd refuses to start without its privilege-separation directory.
if [ "$(id -u)" -eq 0 ]; then
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
fi

echo "setup-hosts: sshd=$(command -v /usr/sbin/sshd || echo missing) ip=$(command -v ip || echo missing)"
