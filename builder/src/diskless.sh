# kiln: a diskless root, for initramfs-tools' /init with boot=kiln.
#
# The kernel command line names the root filesystem and its sha256:
#   boot=kiln ip=dhcp kiln.rootfs=http://SERVER/images/NAME/root.squashfs
#   kiln.rootfs_sha256=HEX
# mountroot brings the network up (initramfs-tools' configure_networking),
# fetches the squashfs into RAM, checks its sha256, and mounts it read-only
# under a tmpfs overlay at ${rootmnt}, with the agent and the spec's files
# from the initrd over it. Everything lives under /run/kiln,
# which /init moves into the new root with /run.

kiln_arg()
{
	for kiln_x in $(cat /proc/cmdline); do
		case "${kiln_x}" in
		"$1"=*)
			echo "${kiln_x#*=}"
			return 0
			;;
		esac
	done
	return 1
}

kiln_fetch()
{
	kiln_tries=0
	while ! /usr/lib/kiln/busybox wget -q -O "$2.part" "$1"; do
		kiln_tries=$((kiln_tries + 1))
		if [ "${kiln_tries}" -ge "${ROOTDELAY:-60}" ]; then
			return 1
		fi
		echo "kiln: fetching $1 failed, retrying in 2 s"
		sleep 2
	done
	mv "$2.part" "$2"
}

mountroot()
{
	kiln_url=$(kiln_arg kiln.rootfs) || panic "kiln: boot=kiln needs kiln.rootfs=URL on the kernel command line"
	kiln_sum=$(kiln_arg kiln.rootfs_sha256) || panic "kiln: boot=kiln needs kiln.rootfs_sha256=HEX on the kernel command line"

	wait_for_udev 10
	configure_networking

	modprobe loop
	insmod /usr/lib/kiln/squashfs.ko
	insmod /usr/lib/kiln/overlay.ko

	mkdir -p /run/kiln
	mount -t tmpfs -o mode=0755 kiln-root /run/kiln
	mkdir -p /run/kiln/lower /run/kiln/upper /run/kiln/work

	echo "kiln: fetching ${kiln_url}"
	kiln_fetch "${kiln_url}" /run/kiln/root.squashfs ||
		panic "kiln: could not fetch ${kiln_url}"
	kiln_got=$(/usr/lib/kiln/busybox sha256sum /run/kiln/root.squashfs)
	kiln_got=${kiln_got%% *}
	if [ "${kiln_got}" != "${kiln_sum}" ]; then
		rm -f /run/kiln/root.squashfs
		panic "kiln: ${kiln_url} has sha256 ${kiln_got}, not ${kiln_sum}: refusing to boot it"
	fi
	echo "kiln: root filesystem sha256 ${kiln_got} verified"

	/usr/lib/kiln/busybox mount -t squashfs -o loop,ro /run/kiln/root.squashfs /run/kiln/lower ||
		panic "kiln: could not mount ${kiln_url}"
	/usr/lib/kiln/busybox mount -t overlay \
		-o lowerdir=/run/kiln/lower,upperdir=/run/kiln/upper,workdir=/run/kiln/work kiln-root "${rootmnt?}" ||
		panic "kiln: could not mount the overlay root"

	# The agent and the spec's files, units and users travel in the initrd,
	# not in the squashfs (a change to them reuses the squashfs): over the
	# root, into the overlay's upper layer, modes, owners and times kept.
	/usr/lib/kiln/busybox cp -af /usr/lib/kiln/additions/. "${rootmnt}/" ||
		panic "kiln: could not copy the agent and the spec's files into the root"

	# A diskless node has no disk file systems to mount.
	echo "# kiln: diskless root (${kiln_url} in RAM under a tmpfs overlay); no disk file systems" >"${rootmnt}/etc/fstab"
}

mount_top()
{
	:
}

mount_premount()
{
	:
}

mount_bottom()
{
	:
}
