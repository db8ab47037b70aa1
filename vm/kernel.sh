#!/usr/bin/env bash
# Builds (or finds in the cache) a kernel with iommufd, its selftest hooks and VFIO, for the
# test guest; and fetches the kernel's UAPI headers for the layout test.
#
#   vm/kernel.sh build     print the path of a cached bzImage, building it first if needed
#   vm/kernel.sh cached    print the path of the cached bzImage; exit 3 if there is none
#   vm/kernel.sh headers   print an include dir holding linux/iommufd.h and linux/vfio.h
#
# Environment:
#   IOMMUFD_TEST_KERNEL      use this bzImage, build nothing
#   IOMMUFD_CACHE_DIR        cache root (default $XDG_CACHE_HOME/bun-iommufd or ~/.cache/bun-iommufd)
#   IOMMUFD_KERNEL_PACKAGE   Debian source package (default: linux-source-7.2, else the newest 7.x)
#   IOMMUFD_BUILD_JOBS       make -j (default: cores + 1)
#
# Progress goes to stderr; the one result line goes to stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/kernel.config"
cache="${IOMMUFD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bun-iommufd}"
apt_dir="$cache/apt-sid"

# Options the tests rely on; a build missing any of them is useless, so it fails loudly.
required_options=(IOMMUFD IOMMUFD_TEST VFIO_PCI VFIO_DEVICE_CDEV VFIO_PCI_DMABUF UDMABUF
  INTEL_IOMMU 9P_FS DEBUG_FS FAULT_INJECTION_DEBUG_FS FAILSLAB FAIL_PAGE_ALLOC HUGETLBFS
  BLK_DEV_NVME IO_URING AIO)

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

sid_update() {
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  local stamp="$apt_dir/lists/.updated"
  # Lists a day old are good enough; a fresh update costs seconds, not minutes.
  if [[ -f "$stamp" && -n "$(find "$stamp" -mmin -1440 2>/dev/null)" ]]; then return; fi
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  printf 'deb [signed-by=%s] %s sid main\n' "$keyring" "$(machine_mirror)" >"$apt_dir/sources.list"
  say "updating the package lists of Debian sid (private apt state in $apt_dir)"
  sid_apt apt-get update >&2 || die "apt-get update for sid failed"
  touch "$stamp"
}

candidate_version() { sid_apt apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }

pick_source_package() {
  if [[ -n "${IOMMUFD_KERNEL_PACKAGE:-}" ]]; then echo "$IOMMUFD_KERNEL_PACKAGE"; return; fi
  # 7.2 is the series whose behaviour the tests were checked against; newer ones are a fallback.
  local v
  v=$(candidate_version linux-source-7.2)
  if [[ -n "$v" && "$v" != "(none)" ]]; then echo linux-source-7.2; return; fi
  sid_apt apt-cache pkgnames linux-source-7. 2>/dev/null | grep -E '^linux-source-7\.[0-9]+$' |
    sort -t. -k2,2n | tail -1 | grep . || die "no linux-source-7.x package in sid"
}

download_deb() { # package dir -> path of the .deb
  local pkg=$1 dir=$2
  mkdir -p "$dir"
  (cd "$dir" && sid_apt apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
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

# Sets pkg, ver, key, out for the kernel the current source and fragment give.
kernel_key() {
  sid_update
  pkg=$(pick_source_package)
  ver=$(candidate_version "$pkg")
  [[ -n "$ver" && "$ver" != "(none)" ]] || die "$pkg has no candidate version in sid"
  # The key changes with the source and with the fragment, so editing the fragment rebuilds.
  key="$pkg-$ver-$(sha256sum "$fragment" | cut -c1-12)"
  out="$cache/kernels/$key"
}

# IOMMUFD_TEST_KERNEL names a bzImage to use as it is: print it (false when unset; dies when missing).
given_kernel() {
  [[ -n "${IOMMUFD_TEST_KERNEL:-}" ]] || return 1
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
  if [[ -f "$out/bzImage" ]]; then
    say "cached: $out/bzImage"
    echo "$out/bzImage"; return
  fi
  say "no cached kernel: building one now (once, 10-15 min on 2 cores; cached in $cache/kernels)"

  local t0=$SECONDS tstep deb tree=$cache/build/$key
  for tool in make gcc flex bison bc xz; do
    command -v $tool >/dev/null || die "'$tool' is missing: install flex bison bc libelf-dev libssl-dev build-essential xz-utils"
  done
  tstep=$SECONDS
  say "downloading $pkg $ver"
  deb=$(download_deb "$pkg" "$cache/downloads")
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
  local missing=()
  for opt in "${required_options[@]}"; do
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
  echo "$out/bzImage"
}

case "${1:-}" in
  build) cmd_build ;;
  cached) cmd_cached ;;
  headers) cmd_headers ;;
  *) echo "usage: $0 build|cached|headers" >&2; exit 2 ;;
esac
