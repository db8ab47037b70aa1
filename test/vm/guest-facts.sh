#!/bin/sh
# Run in the test guest by test/vm/kernels.test.ts: what the guest's init told the command, next
# to what the guest kernel itself shows, one `key=value` line each.
echo "kernel=$IOMMUFD_VM_KERNEL"
echo "features=$IOMMUFD_VM_FEATURES"
echo "devices=$IOMMUFD_VM_DEVICES"
echo "vfio=$IOMMUFD_VM_VFIO"
echo "release=$(uname -r)"
if [ -e /dev/iommu ]; then echo "dev-iommu=yes"; else echo "dev-iommu=no"; fi
if [ -e /dev/vfio/vfio ]; then echo "container=yes"; else echo "container=no"; fi
for dev in /sys/bus/pci/drivers/vfio-pci/0000:*; do
  [ -e "$dev" ] || continue
  group=$(readlink "$dev/iommu_group")
  node=/dev/vfio/${group##*/}
  [ -c "$node" ] && echo "group=${dev##*/}=$node"
done
# Memory the guest uses with the command running (the huge page reserve included).
echo "mem-used-mib=$(free -m | awk '/^Mem:/ {print $3}')"
