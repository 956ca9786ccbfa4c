#!/bin/busybox sh
# kiln tiny image: PID 1. Mounts the kernel filesystems, loads the NIC
# drivers, configures every NIC by DHCP, and keeps kiln-agent running.
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /var/log
while read -r mod; do
  insmod "/lib/modules/$mod" 2>/dev/null || echo "kiln-init: insmod $mod failed"
done < /etc/kiln/modules
ip link set lo up
# kiln.uplink=IFACE:A.B.C.0/24 (kiln up's shared segment): IFACE gets
# A.B.C.<its MAC's last byte>, no DHCP; the agent carries VXLAN over it.
uplink=$(sed -n 's/.*kiln\.uplink=\([^ ]*\).*/\1/p' /proc/cmdline)
up_if=${uplink%%:*}
up_net=${uplink#*:}
[ "$up_net" = "$uplink" ] && up_net=
i=0
while [ "$i" -lt 50 ] && [ -z "$(ls /sys/class/net | grep -v '^lo$')" ]; do sleep 0.1; i=$((i + 1)); done
first_mac=
for dev in /sys/class/net/*; do
  nic=${dev##*/}
  [ "$nic" = lo ] && continue
  [ -z "$first_mac" ] && first_mac=$(cat "$dev/address")
  ip link set "$nic" up
  if [ "$nic" = "$up_if" ] && [ -n "$up_net" ]; then
    last=$(cut -d: -f6 "$dev/address")
    ip addr add "${up_net%.*/*}.$((0x$last))/${up_net#*/}" dev "$nic"
    continue
  fi
  udhcpc -i "$nic" -s /etc/kiln/udhcpc.script -n -q -t 20 -T 1 >/dev/null 2>&1 &
done
wait
# A pool's node is named by the server (kiln.hostname=); any other by its MAC.
name=$(sed -n 's/.*kiln\.hostname=\([^ ]*\).*/\1/p' /proc/cmdline)
hostname "${name:-tiny-$(echo "$first_mac" | tr -d ':' | cut -c7-12)}"
# kiln.load=URL (for testing autoscalers): while URL answers, keep every
# CPU busy at the lowest priority; while it does not, idle. Polled every 2 s.
load_url=$(sed -n 's/.*kiln\.load=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$load_url" ]; then
  (
    burners=
    while true; do
      # (busybox 1.35's wget crashes with -T: timeout bounds it instead)
      if timeout 5 wget -q -O /dev/null "$load_url" 2>/dev/null; then
        if [ -z "$burners" ]; then
          echo "kiln-init: load on"
          for _ in $(seq "$(nproc)"); do
            sh -c 'renice -n 19 -p $$ >/dev/null; while :; do :; done' &
            burners="$burners $!"
          done
        fi
      elif [ -n "$burners" ]; then
        echo "kiln-init: load off"
        kill $burners
        burners=
      fi
      sleep 2
    done
  ) &
fi
echo "kiln-init: $(hostname) up, $(ip -4 -o addr show scope global | awk '{print $2, $4}' | tr '\n' ' ')"
while true; do
  /usr/bin/kiln-agent
  echo "kiln-init: kiln-agent exited ($?), restarting in 1s"
  sleep 1
done
