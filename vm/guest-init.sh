#!/bin/busybox sh
# PID 1 of the test guest (vm/images.ts packs it into a busybox initramfs). Everything that varies per
# run comes from the host through the results share (/results): `config` (shell variables),
# `devices` (one line per device) and `cmd.sh` (the command). The initramfs is cached by the hash
# of this file and busybox, so a change here rebuilds it.
#
# "FATAL" marks a setup failure that a second boot would not cure; the runner then does not retry.
/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "iommufd-vm: $*"; }
fatal() {
  say "FATAL: $*"
  echo "$*" > /results/fatal 2>/dev/null
  sync
  poweroff -f
  sleep 5
  echo o > /proc/sysrq-trigger
}
p9() { mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,"$1" "$2" "$3"; }
# A marker in the kernel log, so the runner can tell warnings during the command from boot noise.
kmsg() { echo "<5>iommufd-vm: $*" > /dev/kmsg; }

mount -t proc proc /proc || fatal "cannot mount /proc"
mount -t sysfs sysfs /sys || fatal "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fatal "cannot mount devtmpfs"
# A stock kernel has virtio, 9p and VFIO as modules: vm/kernel.sh packs them, with their load
# order, into an archive the runner appends to this initramfs.
if [ -f /modules/load ]; then
  for m in $(cat /modules/load); do
    insmod /modules/$m.ko || fatal "cannot load module $m ($(uname -r))"
  done
fi
p9 rw results /results || fatal "cannot mount the results share (9p)"
[ -f /results/config ] || fatal "no /results/config from the host"
# Sets HUGEPAGES, SHARE (where the results share appears in the new root), WORK (host directory
# shared writable at the same path, or empty), KERNEL_PREFIX (prefix of IOMMUFD_VM_KERNEL, e.g.
# "debian", or empty).
. /results/config
# The host tree does not change during a run, so let the guest cache it: much faster bun startup.
p9 ro,cache=loose hostroot /newroot || fatal "cannot mount the host root (9p)"

# Fault injection reaches every allocation: also order-0 pages (IOMMU page tables among them) and
# highmem/movable pages, which fail_page_alloc skips by default (min-order 1, ignore-gfp-highmem Y).
if mount -t debugfs debugfs /sys/kernel/debug; then
  for d in failslab fail_page_alloc; do
    f=/sys/kernel/debug/$d
    [ -d $f ] || continue
    echo N > $f/ignore-gfp-wait
    echo 0 > $f/verbose
    [ -e $f/min-order ] && echo 0 > $f/min-order
    [ -e $f/ignore-gfp-highmem ] && echo N > $f/ignore-gfp-highmem
  done
else
  say "warning: cannot mount debugfs"
fi

echo "$HUGEPAGES" > /proc/sys/vm/nr_hugepages
got=$(cat /proc/sys/vm/nr_hugepages)
[ "$got" = "$HUGEPAGES" ] || say "warning: asked for $HUGEPAGES huge pages, got $got"

# Devices. Each line: PCI address, kind, name, bind (vfio|kernel|none), lists, JSON extras.
# The command gets IOMMUFD_VM_DEVICES (JSON) and IOMMUFD_VM_<list> (addr=node,...) from /results/env.
driver_of() { d=$(readlink /sys/bus/pci/devices/$1/driver 2>/dev/null) && echo "${d##*/}"; }

bind_vfio() {
  dev=/sys/bus/pci/devices/$1
  echo vfio-pci > $dev/driver_override || return 1
  # The kernel's nvme driver probes asynchronously at boot and may bind after a first look, so
  # check the result and repeat (verified sequence: unbind, driver_override, drivers_probe).
  n=0
  while [ "$(driver_of $1)" != vfio-pci ]; do
    [ $n -lt 100 ] || return 1
    [ -e $dev/driver ] && echo $1 > $dev/driver/unbind
    echo $1 > /sys/bus/pci/drivers_probe
    n=$((n + 1))
    [ "$(driver_of $1)" = vfio-pci ] || usleep 100000
  done
}

# Waits until a glob under $1 matches; prints the first match's name.
wait_for() {
  n=0
  while :; do
    for m in $1; do
      [ -e "$m" ] && { echo "${m##*/}"; return 0; }
    done
    [ $n -lt 300 ] || return 1
    n=$((n + 1))
    usleep 100000
  done
}

# Waits for a device node to appear (udev-less: devtmpfs makes it, a moment after the bind).
appear() {
  n=0
  while [ ! -e $1 ]; do
    [ $n -lt 300 ] || fatal "no $1 after 30 s"
    n=$((n + 1))
    usleep 100000
  done
}

# What this kernel has, for the command (IOMMUFD_VM_FEATURES): the suites pick their cases by it.
# 6.1 already has the vfio-dev class in sysfs, but character devices for it (VFIO_DEVICE_CDEV)
# only came with iommufd: ask for the char region instead.
CDEV=""
grep -q ' vfio-dev$' /proc/devices && CDEV=1
features=""
have() { features="$features${features:+,}$1"; }
[ -e /dev/iommu ] && have iommufd
[ -n "$CDEV" ] && have vfio-cdev
[ -e /dev/vfio/vfio ] && have vfio-container
[ -e /sys/kernel/debug/fail_iommufd ] && have iommufd-test
[ -d /sys/kernel/debug/failslab ] && [ -d /sys/kernel/debug/fail_page_alloc ] && have fault-injection
[ -e /dev/udmabuf ] && have udmabuf
[ "$got" -gt 0 ] 2>/dev/null && have hugepages

mkdir -p /results/env
printf '%s' "$features" > /results/env/IOMMUFD_VM_FEATURES
printf '%s%s' "${KERNEL_PREFIX:+$KERNEL_PREFIX-}" "$(uname -r)" > /results/env/IOMMUFD_VM_KERNEL
json=""
if [ -f /results/devices ]; then
  while read -r addr kind name bind lists extra; do
    dev=/sys/bus/pci/devices/$addr
    [ -e $dev ] || fatal "device $name ($kind) is not at $addr in the guest"
    [ "$extra" = - ] && extra=""
    node=""
    case $bind in
      vfio)
        bind_vfio $addr || fatal "cannot bind $name ($addr) to vfio-pci (driver: $(driver_of $addr))"
        g=$(readlink $dev/iommu_group) || fatal "$name ($addr) is on vfio-pci but in no IOMMU group"
        group=/dev/vfio/${g##*/}
        appear $group
        entry="\"driver\":\"vfio-pci\",\"group\":\"$group\""
        # A kernel without VFIO_DEVICE_CDEV (Debian's 6.1) has only the group: the command uses
        # the container API, and the device's node in the lists is its group.
        if [ -n "$CDEV" ]; then
          v=$(wait_for "$dev/vfio-dev/vfio*") || fatal "$name ($addr) is on vfio-pci but has no /dev/vfio/devices node after 30 s"
          node=/dev/vfio/devices/$v
          appear $node
          entry="$entry,\"vfio\":\"$node\""
        else
          node=$group
        fi
        ;;
      kernel)
        c=$(wait_for "$dev/nvme/nvme*") || fatal "$name ($addr) did not come up on the kernel's nvme driver"
        b=$(wait_for "/sys/class/nvme/$c/${c}n*") || fatal "$name ($addr): controller $c has no namespace after 30 s"
        node=/dev/$b
        entry="\"driver\":\"nvme\",\"ctrl\":\"/dev/$c\",\"block\":\"$node\""
        ;;
      *)
        entry="\"driver\":\"$(driver_of $addr)\""
        ;;
    esac
    json="$json${json:+,}{\"name\":\"$name\",\"kind\":\"$kind\",\"addr\":\"$addr\",$entry$extra}"
    if [ "$lists" != - ]; then
      for l in $(echo $lists | tr , ' '); do
        f=/results/env/IOMMUFD_VM_$l
        [ -s $f ] && printf , >> $f
        printf '%s=%s' $addr $node >> $f
      done
    fi
  done < /results/devices
fi
printf '[%s]' "$json" > /results/env/IOMMUFD_VM_DEVICES

r=/newroot
mount -t proc proc $r/proc || fatal "cannot mount proc in the new root"
mount -t sysfs sysfs $r/sys || fatal "cannot mount sysfs in the new root"
mount -t debugfs debugfs $r/sys/kernel/debug 2>/dev/null
mount -t devtmpfs devtmpfs $r/dev || fatal "cannot mount devtmpfs in the new root"
mkdir -p $r/dev/pts $r/dev/shm $r/dev/hugepages
mount -t devpts devpts $r/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $r/dev/shm
mount -t hugetlbfs hugetlbfs $r/dev/hugepages
mount -t tmpfs -o mode=1777 tmpfs $r/tmp || fatal "cannot mount a tmpfs on /tmp in the new root"
# The command's directory, writable, at the host's path (also when it is under /tmp, which the
# tmpfs above would hide). Only the guest writes there during the run, so caching is safe.
if [ -n "$WORK" ]; then
  mkdir -p $r$WORK 2>/dev/null
  p9 rw,cache=loose work $r$WORK || fatal "cannot mount $WORK writable in the guest (9p)"
fi
mkdir -p $r$SHARE
mount -o bind /results $r$SHARE || fatal "cannot bind the results share into the new root"

ulimit -l unlimited
cat /proc/uptime > /results/started
say "starting the command"
kmsg "command starting"
env -i /bin/chroot $r /bin/sh $SHARE/cmd.sh </dev/null >/results/stdout 2>/results/stderr
rc=$?
kmsg "command exited with status $rc"
# The whole kernel log, for the runner's warning check (the console only shows what `quiet` lets
# through, and a WARNING's header is below that level).
dmesg > /results/dmesg 2>/dev/null
echo $rc > /results/exit-code
say "command exited with status $rc"
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
