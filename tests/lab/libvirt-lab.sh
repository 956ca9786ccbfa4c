#!/usr/bin/env bash
# A private libvirtd + virtlogd (system mode) inside a network namespace the
# script makes, for kiln's end-to-end pool tests. Nothing touches the host's
# network or a host libvirtd's state:
#   - every daemon runs in netns $NS and in a private mount namespace where
#     the lab's directories are bind-mounted over /run, /etc/libvirt,
#     /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt;
#   - the libvirt network is isolated (no <forward>), its bridge exists only
#     inside $NS;
#   - the host reaches libvirtd only through its unix socket:
#       qemu+unix:///system?socket=$LAB/run/libvirt/libvirt-sock
#
# Usage (as root):
#   lab.sh up      start netns, virtlogd, libvirtd, network; print the env
#   lab.sh down    stop everything by PID, delete netns and lab dir (also after
#                  a partial or failed up)
#   lab.sh env     print the variables a harness needs
#
# Knobs (environment): KILN_LAB_DIR (default /tmp/kiln-libvirt-lab),
# KILN_LAB_NS (default kiln-lab), KILN_LAB_NET (libvirt network name,
# default kiln-lab), KILN_LAB_SUBNET (first three octets, default 10.213.0),
# KILN_LAB_HTTP_PORT (default 8080), KILN_LAB_CACHE (a directory kept
# between runs for libvirt's QEMU capabilities cache; default: inside the lab,
# deleted by down).
set -euo pipefail

LAB=${KILN_LAB_DIR:-/tmp/kiln-libvirt-lab}
NS=${KILN_LAB_NS:-kiln-lab}
NET=${KILN_LAB_NET:-kiln-lab}
SUBNET=${KILN_LAB_SUBNET:-10.213.0}
PORT=${KILN_LAB_HTTP_PORT:-8080}
BRIDGE=kilnbr0
BRIDGE_IP=$SUBNET.1
ULA=${KILN_LAB_ULA:-fd6b:696c:6e00}
SOCK=$LAB/run/libvirt/libvirt-sock
URI="qemu+unix:///system?socket=$SOCK"
# The same libvirtd over TCP, as a remote host is reached (from inside the
# netns only: it listens in the lab's namespace).
TCP_URI="qemu+tcp://$BRIDGE_IP/system"

log() { printf '%s lab: %s\n' "$(date +%T.%3N)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc | xargs printf '%.2f'; }
v() { virsh -q -c "$URI" "$@"; }
ns_exists() { ip netns list | awk -v ns="$NS" '$1 == ns { f = 1 } END { exit !f }'; }

# The lab's directory -> where the daemons see it.
BINDS=(
  "$LAB/run:/run"
  "$LAB/etc:/etc/libvirt"
  "$LAB/lib:/var/lib/libvirt"
  "${KILN_LAB_CACHE:-$LAB/cache}:/var/cache/libvirt"
  "$LAB/log:/var/log/libvirt"
)

write_config() {
  mkdir -p "$LAB"/{run,etc/qemu/networks,lib,cache,log}
  [ -z "${KILN_LAB_CACHE:-}" ] || mkdir -p "$KILN_LAB_CACHE"
  # Only the config files libvirtd and virtlogd read; no default network,
  # no nwfilters, no hooks from the host's /etc/libvirt.
  cat > "$LAB/etc/libvirtd.conf" <<'EOF'
# root only, no polkit; TCP (libvirtd --listen) with no auth and no TLS,
# bound inside the lab's network namespace, reachable from it only
unix_sock_group = "root"
listen_tls = 0
listen_tcp = 1
auth_tcp = "none"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  cat > "$LAB/etc/virtlogd.conf" <<'EOF'
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
EOF
  cat > "$LAB/etc/qemu.conf" <<'EOF'
# QEMU runs as root, unconfined, outside cgroups: no apparmor/selinux
# labelling, no chown of images, no cgroup directories on the host.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
# serial <log file=..> and the domain log go through virtlogd
stdio_handler = "logd"
EOF
  cat > "$LAB/etc/network.conf" <<'EOF'
# no nft binary on the host; iptables (nf_tables flavour) rules land in the
# lab's netns only
firewall_backend = "iptables"
EOF
  cat > "$LAB/etc/libvirt.conf" <<'EOF'
EOF
}

start_daemons() {
  local t0 mounts="" pair
  t0=$(now)
  for pair in "${BINDS[@]}"; do
    [ -d "${pair#*:}" ] || die "${pair#*:} missing on the host (is libvirt-daemon-system installed?)"
    mounts+="mount --bind '${pair%%:*}' '${pair#*:}'; "
  done
  # One mount namespace for both daemons (ip netns exec makes a new one per
  # call, so they must start from the same shell). Propagation private: the
  # binds never show on the host. QEMU and dnsmasq inherit both namespaces.
  ip netns exec "$NS" unshare --mount --propagation private bash -euc "
    $mounts
    mkdir -p /run/libvirt
    virtlogd -d -p /run/virtlogd.pid
    libvirtd -d --listen -p /run/libvirtd.pid
  "
  local i
  for i in $(seq 1 300); do
    if [ -S "$SOCK" ] && v version >/dev/null 2>&1; then
      log "libvirtd answers after $(since "$t0") s"
      return 0
    fi
    sleep 0.1
  done
  die "libvirtd did not answer on $SOCK in 30 s; see $LAB/log/libvirtd.log"
}

define_network() {
  local t0
  t0=$(now)
  cat > "$LAB/network.xml" <<EOF
<network>
  <name>$NET</name>
  <bridge name='$BRIDGE' stp='off' delay='0'/>
  <dns enable='no'/>
  <ip address='$BRIDGE_IP' netmask='255.255.255.0'>
    <dhcp>
      <range start='$SUBNET.100' end='$SUBNET.199'/>
      <bootp file='http://$BRIDGE_IP:$PORT/boot.ipxe'/>
    </dhcp>
  </ip>
  <!-- Only so dnsmasq sends router advertisements: iPXE's "Configuring"
       step waits for IPv6 autoconfiguration too, about 13 s under TCG
       when no router answers. -->
  <ip family='ipv6' address='$ULA::1' prefix='64'/>
</network>
EOF
  v net-define "$LAB/network.xml" >/dev/null
  v net-start "$NET" >/dev/null
  log "network $NET ($BRIDGE $BRIDGE_IP/24, isolated) up after $(since "$t0") s"
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "run as root"
  for c in ip unshare virsh libvirtd virtlogd qemu-system-x86_64 dnsmasq iptables python3 bc; do
    command -v "$c" >/dev/null || die "$c not found"
  done
  [ ! -e "$LAB" ] || die "$LAB exists: run '$0 down' first"
  ! ns_exists || die "netns $NS exists: run '$0 down' first"
  # a failed or interrupted up cleans after itself (EXIT, not ERR: set -e
  # inside functions does not fire an ERR trap without set -E). fd 9 keeps
  # the real stderr: a signal may arrive inside `v version 2>/dev/null`.
  exec 9>&2
  trap 'rc=$?; trap - EXIT; if [ $rc != 0 ]; then { log "up failed ($rc); cleaning up"; cmd_down; } 2>&9; fi; exit $rc' EXIT
  trap 'exit 130' INT TERM
  write_config
  ip netns add "$NS"
  ip -n "$NS" link set lo up
  start_daemons
  define_network
  cmd_env
}

cmd_env() {
  cat <<EOF
KILN_LAB_DIR=$LAB
KILN_LAB_NS=$NS
KILN_LAB_URI=$URI
KILN_LAB_TCP_URI=$TCP_URI
KILN_LAB_NET=$NET
KILN_LAB_BRIDGE_IP=$BRIDGE_IP
KILN_LAB_BOOT_URL=http://$BRIDGE_IP:$PORT/boot.ipxe
EOF
}

# PID in a file, if the process lives.
pid_of() { local p; p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"; }

stop_pids() {
  local p i alive
  [ $# -gt 0 ] || return 0
  log "stopping PIDs $*"
  # A process may end between the caller's check and this signal: the
  # loop below finds out which are left, so a failed kill is not an error.
  kill -TERM "$@" 2>/dev/null || true
  for i in $(seq 1 50); do
    alive=()
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
    [ ${#alive[@]} -gt 0 ] || return 0
    sleep 0.1
  done
  log "killing PIDs ${alive[*]}"
  for p in "${alive[@]}"; do
    # One that ended since the check is fine; one SIGKILL cannot reach is not.
    kill -KILL "$p" 2>/dev/null || ! kill -0 "$p" 2>/dev/null || die "cannot kill PID $p"
  done
}

cmd_down() {
  local t0 pids=() f p d
  t0=$(now)
  # Best effort, as down must also finish after a partial up: a domain or
  # network that is already stopped or gone makes virsh fail, and whatever
  # libvirt leaves running is stopped by PID below anyway.
  if [ -S "$SOCK" ] && timeout 5 virsh -q -c "$URI" version >/dev/null 2>&1; then
    for d in $(timeout 10 virsh -q -c "$URI" list --all --name 2>/dev/null); do
      timeout 10 virsh -q -c "$URI" destroy "$d" >/dev/null 2>&1 || true
      timeout 10 virsh -q -c "$URI" undefine "$d" >/dev/null 2>&1 || true
    done
    for d in $(timeout 10 virsh -q -c "$URI" net-list --all --name 2>/dev/null); do
      timeout 10 virsh -q -c "$URI" net-destroy "$d" >/dev/null 2>&1 || true
      timeout 10 virsh -q -c "$URI" net-undefine "$d" >/dev/null 2>&1 || true
    done
  fi
  # Children first (QEMU, dnsmasq), then libvirtd, then virtlogd (it
  # holds the QEMU logs until QEMU is gone).
  for f in "$LAB"/run/libvirt/qemu/*.pid "$LAB"/run/libvirt/network/*.pid; do
    # driver.pid in those directories is libvirtd's own
    [ "${f##*/}" != driver.pid ] || continue
    p=$(pid_of "$f") && pids+=("$p")
  done
  stop_pids "${pids[@]}"
  p=$(pid_of "$LAB/run/libvirtd.pid") && stop_pids "$p"
  p=$(pid_of "$LAB/run/virtlogd.pid") && stop_pids "$p"
  # Whatever else still runs in the netns was started by this lab (e.g. a
  # daemon whose PID file was never written).
  if ns_exists; then
    mapfile -t pids < <(ip netns pids "$NS" 2>/dev/null)
    stop_pids "${pids[@]}"
    ip netns del "$NS"
  fi
  # The binds lived only in the daemons' private mount namespace, which is
  # gone with them: $LAB holds plain directories again.
  if [ -d "$LAB" ]; then
    if grep -q " $LAB" /proc/self/mountinfo; then die "$LAB still has mounts on the host"; fi
    rm -rf "$LAB"
  fi
  log "down in $(since "$t0") s"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
