/**
 * Iommufd: an open /dev/iommu. It owns the fd; every object created through it (IOAS, hw page
 * tables) dies with it, which the kernel guarantees and the library mirrors by marking them closed.
 */
import { argumentError, closedError } from "../sys/error.ts";
import { closeFd, fdFinalizer, openPath, requireOpenFd, setCloseOnExec } from "../sys/fd.ts";
import type { ErrnoTable } from "../sys/errno-table.ts";
import { ioctl } from "../sys/ioctl.ts";
import { O_RDWR } from "../sys/libc.ts";
import type { StructBuffer } from "../uapi/codec.ts";
import { IOMMU_OPTION_OP_GET, IOMMU_OPTION_OP_SET, IOMMU_OPTION_RLIMIT_MODE } from "../uapi/iommufd.ts";
import { type IommufdFeatures, probeFeatures } from "./features.ts";
import { Ioas } from "./ioas.ts";
import { allocIoas, destroyObject, option } from "./ioctls.ts";

export const DEFAULT_IOMMU_PATH = "/dev/iommu";

/** How pinned pages are charged against RLIMIT_MEMLOCK (IOMMU_OPTION_RLIMIT_MODE). */
export type RlimitMode = "user" | "process";

/** Something the Iommufd must mark dead when it closes. */
interface Owned {
  markGone(): void;
}

export class Iommufd {
  #fd: number;
  readonly #owned = new Set<Owned>();
  readonly #closeOnDispose: boolean;
  #features: IommufdFeatures | undefined;

  private constructor(fd: number, owned: boolean) {
    this.#fd = fd;
    this.#closeOnDispose = owned;
    if (owned) fdFinalizer.register(this, fd, this);
  }

  /** Open the iommufd character device (close-on-exec). */
  static open(path: string = DEFAULT_IOMMU_PATH): Iommufd {
    const fd = openPath(path, O_RDWR, "Iommufd.open", {
      ENOENT: { hint: "the running kernel has no iommufd: it needs CONFIG_IOMMUFD=y (run `bunx bun-iommufd doctor`)" },
      EACCES: { hint: `no permission to open ${path}: run as root, or give this user access to the device node` },
      EPERM: {
        hint: `not permitted to open ${path}: check the device node's permissions and any security module policy`,
      },
    });
    return new Iommufd(fd, true);
  }

  /**
   * Wrap an fd that is already an iommufd (handed over by another process, say). With
   * `takeOwnership` (the default) close() closes it; otherwise the caller keeps that duty.
   */
  static fromFd(fd: number, options: { takeOwnership?: boolean } = {}): Iommufd {
    requireOpenFd(fd, "Iommufd.fromFd", "fd");
    const owned = options.takeOwnership ?? true;
    // An fd inherited from a parent arrives without FD_CLOEXEC; one the library owns must have it.
    if (owned) setCloseOnExec(fd, "Iommufd.fromFd");
    return new Iommufd(fd, owned);
  }

  get fd(): number {
    return this.assertOpen("Iommufd.fd");
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  /** @internal Throws EBADF once closed; the fd otherwise. */
  assertOpen(operation: string): number {
    if (this.#fd < 0) throw closedError(operation, "the Iommufd");
    return this.#fd;
  }

  /** @internal */
  track(object: Owned): void {
    this.#owned.add(object);
  }

  /** @internal */
  untrack(object: Owned): void {
    this.#owned.delete(object);
  }

  /**
   * @internal One ioctl on this iommufd through the library's one path (src/sys/ioctl.ts):
   * returns the kernel's result or throws, worded by `errors`.
   */
  ioctl<Context = undefined>(
    request: number,
    cmd: StructBuffer,
    operation: string,
    errors?: ErrnoTable<Context>,
    context?: Context,
  ): number {
    return ioctl(this.assertOpen(operation), request, cmd, operation, errors, context);
  }

  /**
   * Which optional iommufd commands the running kernel knows (MAP_FILE, HWPT, dirty tracking, fault
   * queues, change-process), asked of the kernel once, on first use.
   */
  get features(): IommufdFeatures {
    this.#features ??= probeFeatures(this.assertOpen("Iommufd.features"));
    return this.#features;
  }

  /** Allocate an I/O address space (IOMMU_IOAS_ALLOC). */
  createIoas(): Ioas {
    const op = "IOMMU_IOAS_ALLOC";
    const ioas = new Ioas(this, allocIoas(this.assertOpen(op), op));
    this.track(ioas);
    return ioas;
  }

  /** IOMMU_DESTROY of any object id (IOAS, hw page table, ...). */
  destroyObject(id: number, operation = "IOMMU_DESTROY"): void {
    destroyObject(this.assertOpen(operation), id, operation);
  }

  /** IOMMU_OPTION RLIMIT_MODE: how this process's pinned pages are charged to RLIMIT_MEMLOCK. */
  get rlimitMode(): RlimitMode {
    return this.option(IOMMU_OPTION_RLIMIT_MODE, 0, IOMMU_OPTION_OP_GET, 0n) === 0n ? "user" : "process";
  }

  /** Setting it needs CAP_SYS_RESOURCE and is refused (EBUSY) once anything is pinned. */
  set rlimitMode(mode: RlimitMode) {
    if (mode !== "user" && mode !== "process") {
      throw argumentError("IOMMU_OPTION", "rlimitMode", `"${String(mode)}" is not "user" or "process"`);
    }
    this.option(IOMMU_OPTION_RLIMIT_MODE, 0, IOMMU_OPTION_OP_SET, mode === "user" ? 0n : 1n);
  }

  /** @internal IOMMU_OPTION get/set; returns val64. */
  option(optionId: number, objectId: number, op: number, value: bigint): bigint {
    return option(this.assertOpen("IOMMU_OPTION"), optionId, objectId, op, value);
  }

  /** Close the iommufd. The kernel destroys every object in it; the library marks them closed. */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    fdFinalizer.unregister(this);
    for (const object of this.#owned) object.markGone();
    this.#owned.clear();
    if (this.#closeOnDispose) closeFd(fd, "Iommufd.close");
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
