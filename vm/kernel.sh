#!/usr/bin/env bash
# Builds, fetches or finds in the cache a kernel for the test guest; and fetches the kernel's UAPI
# headers for the layout test. The kernels (NAME, default 7.2):
#   7.2     Debian's linux-source-7.2 (sid) built with kernel.config: iommufd and everything else
#   6.12    Debian's linux-source-6.12 (6.12 LTS, the machine's own suites) built the same way:
#           iommufd without MAP_FILE or VFIO dma-buf export
#   debian  the machine's stock generic kernel exactly as shipped (linux-image-*-amd64-unsigned):
#           no iommufd on Debian 12, VFIO type1 and 9p as modules, which go into modules.cpio
#           beside the image for the guest's initramfs
#
#   vm/kernel.sh build [NAME]    print the path of a cached bzImage, fetching or building it first
#   vm/kernel.sh cached [NAME]   print the path of the cached bzImage; exit 3 if there is none
#   vm/kernel.sh headers         print an include dir holding linux/iommufd.h and linux/vfio.h
#
# Environment:
#   IOMMUFD_TEST_KERNEL      use this bzImage instead of the 7.2 build, build nothing
#   IOMMUFD_CACHE_DIR        cache root (default $XDG_CACHE_HOME/bun-iommufd or ~/.cache/bun-iommufd)
#   IOMMUFD_KERNEL_PACKAGE   Debian source package for 7.2 (default: linux-source-7.2, else the newest 7.x)
#   IOMMUFD_BUILD_JOBS       make -j (default: cores + 1)
#
# Progress goes to stderr; the one result line goes to stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/kernel.config"
cache="${IOMMUFD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bun-iommufd}"
apt_dir="$cache/apt-sid"
machine_apt_dir="$cache/apt-machine"

# Options the tests rely on; a build missing any of them is useless, so it fails loudly.
required_options=(IOMMUFD IOMMUFD_TEST VFIO_PCI VFIO_DEVICE_CDEV VFIO_PCI_DMABUF UDMABUF
  INTEL_IOMMU 9P_FS DEBUG_FS FAULT_INJECTION_DEBUG_FS FAILSLAB FAIL_PAGE_ALLOC HUGETLBFS
  BLK_DEV_NVME IO_URING AIO)
# What 6.12 does not have at all (VFIO dma-buf export came later): the fragment names it, the
# series has no such option, so it stays unset there and only there.
lacking_6_12=(VFIO_PCI_DMABUF)
# The stock kernel must boot the guest from its own modules: VFIO type1 and 9p over virtio.
required_stock=(VFIO VFIO_IOMMU_TYPE1 VFIO_PCI INTEL_IOMMU IRQ_REMAP VIRTIO_PCI NET_9P NET_9P_VIRTIO
  9P_FS BLK_DEV_NVME DEVTMPFS HUGETLBFS)
# Modules the guest loads, in an order that satisfies their depends= (closed over below). Nothing
# depends on virtio_pci, 9pnet_virtio or vfio_iommu_type1 (they are found at run time), so each
# is named here.
stock_modules=(virtio_pci 9pnet_virtio 9p vfio_iommu_type1 vfio_pci nvme)

say() { printf '[kernel %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The sid suite on the same mirror the machine already uses: Debian's 7.x kernels live there.
machine_mirror() {
  local uri=""
  if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
    uri=$(awk 'tolower($1)=="uris:" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources)
  fi
  if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
    uri=$(awk '$1=="deb" && $0 !~ /security/ { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit} }' /etc/apt/sources.list)
  fi
  [[ -n "$uri" ]] || die "found no Debian mirror in /etc/apt/sources.list{,.d}; cannot fetch the kernel source"
  printf '%s\n' "$uri"
}

# apt with its own lists, cache and sources: the machine's apt state is never touched.
sid_apt() {
  local cmd=$1; shift
  # Keep apt's binary caches (this machine's apt.conf may disable them): a lookup drops from
  # seconds to 0.1 s, and every guest run does one.
  "$cmd" -q -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" \
    -o Dir::Cache::pkgcache=pkgcache.bin -o Dir::Cache::srcpkgcache=srcpkgcache.bin \
    -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null \
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root "$@"
}

# True when the private lists in $1 are a day old at most: good enough, and a fresh update costs
# seconds, not minutes.
lists_fresh() { [[ -f "$1/lists/.updated" && -n "$(find "$1/lists/.updated" -mmin -1440 2>/dev/null)" ]]; }

# Runs an update of the private apt state in $1 with the function $2, one run at a time: apt's
# own lock is off (private state, no root needed), and two updates at once wreck each other's
# partial downloads.
locked_update() {
  local dir=$1 update=$2
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  lists_fresh "$dir" && return
  (
    flock 8
    lists_fresh "$dir" && exit 0
    "$update"
    touch "$dir/lists/.updated"
  ) 8>"$dir/update.lock"
}

sid_update() { locked_update "$apt_dir" sid_lists; }
sid_lists() {
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  printf 'deb [signed-by=%s] %s sid main\n' "$keyring" "$(machine_mirror)" >"$apt_dir/sources.list"
  say "updating the package lists of Debian sid (private apt state in $apt_dir)"
  sid_apt apt-get update >&2 || die "apt-get update for sid failed"
}

candidate_version() { sid_apt apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }

# apt on the machine's own sources (copied as they are: same mirrors, same suites, e.g. bookworm
# and bookworm-security) with private lists and cache: the machine's apt state is never touched.
machine_apt() {
  local cmd=$1; shift
  "$cmd" -q -o Dir::State::Lists="$machine_apt_dir/lists" -o Dir::Cache="$machine_apt_dir/cache" \
    -o Dir::Cache::pkgcache=pkgcache.bin -o Dir::Cache::srcpkgcache=srcpkgcache.bin \
    -o Dir::Etc::SourceList="$machine_apt_dir/sources.list" \
    -o Dir::Etc::SourceParts="$machine_apt_dir/sources.list.d" \
    -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null \
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root "$@"
}

machine_update() { locked_update "$machine_apt_dir" machine_lists; }
machine_lists() {
  rm -rf "$machine_apt_dir/sources.list.d" && mkdir -p "$machine_apt_dir/sources.list.d"
  : >"$machine_apt_dir/sources.list"
  [[ -f /etc/apt/sources.list ]] && cp /etc/apt/sources.list "$machine_apt_dir/sources.list"
  local f
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [[ -f "$f" ]] && cp "$f" "$machine_apt_dir/sources.list.d/"
  done
  say "updating the package lists of the machine's own apt sources (private apt state in $machine_apt_dir)"
  machine_apt apt-get update >&2 || die "apt-get update on the machine's sources failed"
}

machine_version() { machine_apt apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }

pick_source_package() {
  if [[ -n "${IOMMUFD_KERNEL_PACKAGE:-}" ]]; then echo "$IOMMUFD_KERNEL_PACKAGE"; return; fi
  # 7.2 is the series whose behaviour the tests were checked against; newer ones are a fallback.
  local v
  v=$(candidate_version linux-source-7.2)
  if [[ -n "$v" && "$v" != "(none)" ]]; then echo linux-source-7.2; return; fi
  sid_apt apt-cache pkgnames linux-source-7. 2>/dev/null | grep -E '^linux-source-7\.[0-9]+$' |
    sort -t. -k2,2n | tail -1 | grep . || die "no linux-source-7.x package in sid"
}

download_deb() { # package dir [apt function] -> path of the .deb
  local pkg=$1 dir=$2 apt=${3:-sid_apt}
  mkdir -p "$dir"
  (cd "$dir" && "$apt" apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
  ls -t "$dir"/"${pkg}"_*.deb | head -1
}

cmd_headers() {
  sid_update
  local ver dir
  ver=$(candidate_version linux-libc-dev)
  [[ -n "$ver" && "$ver" != "(none)" ]] || die "linux-libc-dev has no candidate in sid"
  dir="$cache/headers/linux-libc-dev-$ver"
  if [[ ! -f "$dir/usr/include/linux/iommufd.h" ]]; then
    say "fetching linux-libc-dev $ver (kernel UAPI headers)"
    local deb
    deb=$(download_deb linux-libc-dev "$cache/downloads")
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    dpkg-deb -x "$deb" "$dir.tmp"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir/usr/include"
}

# Sets pkg, ver, key, out for the kernel NAME ($name) gives with the current packages and fragment.
kernel_key() {
  case "$name" in
    7.2)
      sid_update
      pkg=$(pick_source_package)
      ver=$(candidate_version "$pkg")
      [[ -n "$ver" && "$ver" != "(none)" ]] || die "$pkg has no candidate version in sid"
      ;;
    6.12)
      machine_update
      pkg=linux-source-6.12
      ver=$(machine_version "$pkg")
      [[ -n "$ver" && "$ver" != "(none)" ]] ||
        die "$pkg is not in the machine's apt sources (Debian 12 has it in bookworm-security)"
      ;;
    debian)
      machine_update
      # The newest ABI of the generic flavour; the cloud flavour has no 9p, so the guest could
      # not reach the host's files.
      pkg=$(machine_apt apt-cache pkgnames linux-image- 2>/dev/null |
        grep -E '^linux-image-[0-9]+\.[0-9]+\.[0-9]+-[0-9]+-amd64-unsigned$' | sort -V | tail -1)
      [[ -n "$pkg" ]] || die "no linux-image-*-amd64-unsigned package in the machine's apt sources"
      ver=$(machine_version "$pkg")
      [[ -n "$ver" && "$ver" != "(none)" ]] || die "$pkg has no candidate version"
      key="$pkg-$ver"
      out="$cache/kernels/$key"
      return
      ;;
  esac
  # The key changes with the source and with the fragment, so editing the fragment rebuilds.
  key="$pkg-$ver-$(sha256sum "$fragment" | cut -c1-12)"
  out="$cache/kernels/$key"
}

# IOMMUFD_TEST_KERNEL names a bzImage to use as it is instead of the 7.2 build: print it (false
# when unset or another kernel is asked for; dies when missing).
given_kernel() {
  [[ "$name" == 7.2 && -n "${IOMMUFD_TEST_KERNEL:-}" ]] || return 1
  [[ -f "$IOMMUFD_TEST_KERNEL" ]] || die "IOMMUFD_TEST_KERNEL=$IOMMUFD_TEST_KERNEL does not exist"
  echo "$IOMMUFD_TEST_KERNEL"
}

# Prints the cached bzImage's path, or exits 3 when none is cached (builds nothing).
cmd_cached() {
  given_kernel && return
  local pkg ver key out
  kernel_key
  [[ -f "$out/bzImage" ]] || { say "no cached kernel for $key"; exit 3; }
  echo "$out/bzImage"
}

cmd_build() {
  given_kernel && return
  local pkg ver key out
  kernel_key
  # Two runs asking for the same kernel at once (two test runs, a test run and a user) would
  # unpack into one tree and wreck each other's build: the second waits, then finds it cached.
  mkdir -p "$cache/build"
  exec 9>"$cache/build/$key.lock"
  if ! flock -n 9; then
    say "another run is fetching or building $key: waiting for it"
    flock 9
  fi
  if [[ -f "$out/bzImage" ]]; then
    say "cached: $out/bzImage"
    echo "$out/bzImage"; return
  fi
  if [[ "$name" == debian ]]; then fetch_stock; else build_source; fi
  echo "$out/bzImage"
}

# The stock kernel as shipped: its image, its config, and the modules the guest loads, packed as
# a cpio archive that the runner appends to the initramfs (the kernel unpacks both).
fetch_stock() {
  local t0=$SECONDS deb tree=$cache/build/$key
  say "downloading $pkg $ver"
  deb=$(download_deb "$pkg" "$cache/downloads" machine_apt)
  say "downloaded $(du -h "$deb" | cut -f1) in $((SECONDS - t0)) s"
  rm -rf "$tree" && mkdir -p "$tree/pkg" "$tree/initramfs/modules"
  dpkg-deb -x "$deb" "$tree/pkg"
  local release image config
  release=$(basename "$(find "$tree/pkg/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -1)")
  image="$tree/pkg/boot/vmlinuz-$release"
  config="$tree/pkg/boot/config-$release"
  [[ -f "$image" && -f "$config" ]] || die "$deb holds no boot/vmlinuz-$release with its config"
  local missing=()
  for opt in "${required_stock[@]}"; do
    grep -Eqx "CONFIG_$opt=[ym]" "$config" || missing+=("CONFIG_$opt")
  done
  ((${#missing[@]} == 0)) || die "$pkg lacks ${missing[*]}: the guest cannot run on it"

  # No modules.dep in the package (depmod runs at install): each module's depends= is in its
  # .modinfo section. Load order = dependencies first, depth first from stock_modules.
  local -A files=() loaded=()
  local f base order=()
  while IFS= read -r f; do
    base=$(basename "$f" .ko)
    files[${base//-/_}]=$f
  done < <(find "$tree/pkg/lib/modules/$release" -name '*.ko')
  visit() {
    local m=${1//-/_} dep deps
    [[ -n "${loaded[$m]:-}" ]] && return
    [[ -n "${files[$m]:-}" ]] || die "$pkg has no module $m"
    loaded[$m]=1
    # Reads the whole file (no early exit): under pipefail, tr must not die of SIGPIPE.
    deps=$(tr '\0' '\n' <"${files[$m]}" | LC_ALL=C awk 'sub(/^depends=/, "") && !n++')
    for dep in ${deps//,/ }; do visit "$dep"; done
    order+=("$m")
    cp "${files[$m]}" "$tree/initramfs/modules/$m.ko"
  }
  local m
  for m in "${stock_modules[@]}"; do visit "$m"; done
  printf '%s\n' "${order[@]}" >"$tree/initramfs/modules/load"
  say "modules for the guest, in load order: ${order[*]}"

  mkdir -p "$out"
  (cd "$tree/initramfs" && find . | cpio -o -H newc -R 0:0 --quiet) >"$out/modules.cpio"
  cp "$config" "$out/config"
  printf '%s\n' "$release" >"$out/release"
  cp "$image" "$out/bzImage.tmp"
  mv "$out/bzImage.tmp" "$out/bzImage"
  rm -rf "$tree"
  say "kernel ready in $((SECONDS - t0)) s: $out/bzImage ($release, as shipped)"
}

build_source() {
  say "no cached kernel: building one now (once, 10-15 min on 2 cores; cached in $cache/kernels)"

  local t0=$SECONDS tstep deb tree=$cache/build/$key apt=sid_apt
  [[ "$name" == 7.2 ]] || apt=machine_apt
  for tool in make gcc flex bison bc xz; do
    command -v $tool >/dev/null || die "'$tool' is missing: install flex bison bc libelf-dev libssl-dev build-essential xz-utils"
  done
  tstep=$SECONDS
  say "downloading $pkg $ver"
  deb=$(download_deb "$pkg" "$cache/downloads" "$apt")
  say "downloaded $(du -h "$deb" | cut -f1) in $((SECONDS - tstep)) s"

  tstep=$SECONDS
  rm -rf "$tree" && mkdir -p "$tree"
  say "unpacking the source"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tree" --wildcards '*.tar.xz'
  local tarball
  tarball=$(find "$tree" -name 'linux-source-*.tar.xz' | head -1)
  [[ -n "$tarball" ]] || die "no source tarball inside $deb"
  tar -xJf "$tarball" -C "$tree"
  rm -f "$tarball"
  local src
  src=$(find "$tree" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -1)
  say "unpacked in $((SECONDS - tstep)) s"

  tstep=$SECONDS
  say "configuring: x86_64_defconfig + kvm_guest.config + $(basename "$fragment")"
  (
    cd "$src"
    make -s x86_64_defconfig
    make -s kvm_guest.config
    scripts/kconfig/merge_config.sh -m .config "$fragment"
    make -s olddefconfig
  ) >"$tree/config.log" 2>&1 || { tail -20 "$tree/config.log" >&2; die "configuring failed (log: $tree/config.log)"; }
  local missing=() lacking=() opt
  if [[ "$name" == 6.12 ]]; then
    lacking=("${lacking_6_12[@]}")
    for opt in "${lacking[@]}"; do
      # Should the series gain it, it is required there too: drop it from lacking_6_12.
      ! grep -rqx "config $opt" --include='Kconfig*' "$src" || die "$pkg has $opt after all: require it (vm/kernel.sh)"
    done
  fi
  for opt in "${required_options[@]}"; do
    [[ " ${lacking[*]} " == *" $opt "* ]] && continue
    grep -qx "CONFIG_$opt=y" "$src/.config" || missing+=("CONFIG_$opt")
  done
  ((${#missing[@]} == 0)) || die "the configured kernel lacks ${missing[*]} (dependencies changed?)"

  local jobs=${IOMMUFD_BUILD_JOBS:-$(($(nproc) + 1))}
  say "building bzImage with make -j$jobs (10-15 min on 2 cores; progress every 30 s)"
  (cd "$src" && make -j"$jobs" bzImage >"$tree/build.log" 2>&1) &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30 &
    wait $! || true
    kill -0 "$pid" 2>/dev/null || break
    say "building: $(grep -c '^ *CC ' "$tree/build.log" || true) files compiled, $((SECONDS - tstep)) s"
  done
  wait "$pid" || { tail -30 "$tree/build.log" >&2; die "make bzImage failed (log: $tree/build.log)"; }
  say "built in $((SECONDS - tstep)) s"

  mkdir -p "$out"
  cp "$src/arch/x86/boot/bzImage" "$out/bzImage.tmp"
  cp "$src/.config" "$out/config"
  # The selftest command layout lives outside the exported UAPI; keep it for the layout test.
  mkdir -p "$out/include"
  cp "$src/drivers/iommu/iommufd/iommufd_test.h" "$out/include/"
  mv "$out/bzImage.tmp" "$out/bzImage"
  rm -rf "$tree"
  say "kernel ready in $((SECONDS - t0)) s: $out/bzImage"
}

name=${2:-7.2}
case "$name" in
  7.2 | 6.12 | debian) ;;
  *) echo "$0: unknown kernel '$name' (known: 7.2, 6.12, debian)" >&2; exit 2 ;;
esac
case "${1:-}" in
  build) cmd_build ;;
  cached) cmd_cached ;;
  headers) cmd_headers ;;
  *) echo "usage: $0 build|cached [7.2|6.12|debian] | headers" >&2; exit 2 ;;
esac
