# Runs inside a kiln worker VM, as root over SSH (tests/src/guest.rs): what
# a user would do to check the pod network by hand, without kiln's agent.
# The image has python3 (cloud-init needs it) but no ping, so ICMP goes
# through raw sockets.
#
#   add NAME        a pod: network namespace NAME wired by the plugins of
#                   /etc/cni/net.d/10-flannel.conflist, as a runtime does;
#                   prints its address
#   ping IP         echo requests to IP until one is answered (3 s)
#   listen SECONDS  prints the source of every echo request `ping` sent here
#   watch           prints "fdb TIME LINE" for each FDB change, and
#                   "clock TIME" for each line read on stdin
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

CONFLIST = "/etc/cni/net.d/10-flannel.conflist"
CNI_PATH = "/usr/lib/cni"
MARK = b"kiln-guest-ping"


def add(name):
    subprocess.run(["ip", "netns", "add", name], check=True)
    with open(CONFLIST) as f:
        conflist = json.load(f)
    prev = None
    for plugin in conflist["plugins"]:
        conf = dict(plugin, name=conflist["name"], cniVersion=conflist["cniVersion"])
        if prev is not None:
            conf["prevResult"] = prev
        env = dict(os.environ, CNI_COMMAND="ADD", CNI_CONTAINERID=name, CNI_NETNS="/run/netns/" + name,
                   CNI_IFNAME="eth0", CNI_PATH=CNI_PATH)
        out = subprocess.run([CNI_PATH + "/" + plugin["type"]], input=json.dumps(conf).encode(), env=env,
                             capture_output=True)
        if out.returncode != 0:
            sys.exit("CNI %s ADD: %s %s" % (plugin["type"], out.stdout.decode(), out.stderr.decode()))
        prev = json.loads(out.stdout)
    print(prev["ips"][0]["address"].split("/")[0])


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp(data):
    ihl = (data[0] & 15) * 4
    kind, _, _, ident, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
    return kind, ident, data[ihl + 8:]


def ping(ip):
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(0.5)
    ident = os.getpid() & 0xFFFF
    for seq in range(6):
        packet = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + MARK
        packet = packet[:2] + struct.pack("!H", checksum(packet)) + packet[4:]
        sock.sendto(packet, (ip, 0))
        deadline = time.time() + 0.5
        while time.time() < deadline:
            try:
                data, addr = sock.recvfrom(2048)
            except socket.timeout:
                break
            kind, got, _ = icmp(data)
            if kind == 0 and got == ident and addr[0] == ip:
                print("reply from", ip)
                return
    sys.exit("no echo reply from " + ip)


def listen(seconds):
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(1)
    end = time.time() + float(seconds)
    while time.time() < end:
        try:
            data, addr = sock.recvfrom(2048)
        except socket.timeout:
            continue
        kind, _, payload = icmp(data)
        if kind == 8 and payload == MARK:
            print(addr[0], flush=True)


def watch():
    monitor = subprocess.Popen(["bridge", "monitor", "fdb"], stdout=subprocess.PIPE, text=True)

    def fdb():
        for line in monitor.stdout:
            print("fdb %.6f %s" % (time.time(), line.strip()), flush=True)

    threading.Thread(target=fdb, daemon=True).start()
    print("watching", flush=True)
    for _ in sys.stdin:
        print("clock %.6f" % time.time(), flush=True)
    monitor.kill()


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"add": add, "ping": ping, "listen": listen, "watch": watch}[command](*args)
