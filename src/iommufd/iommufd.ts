/**
 * Iommufd: an open /dev/iommu. It owns the fd; every object created through it (IOAS, hw page
 * tables) dies with it, which the kernel guarantees and the library mirrors by marking them closed.
 */
import { argumentError, closedError } from "../sys/error.ts";
import { closeFd, fdFinalizer, openPath, requireOpenFd, setCloseOnExec } from "../sys/fd.ts";
import { type ErrnoTable, ioctl } from "../sys/ioctl.ts";
import { O_RDWR } from "../sys/libc.ts";
import type { StructBuffer } from "../uapi/codec.ts";
import {
  IOMMU_DESTROY,
  IOMMU_IOAS_ALLOC,
  IOMMU_OPTION,
  IOMMU_OPTION_OP_GET,
  IOMMU_OPTION_OP_SET,
  IOMMU_OPTION_RLIMIT_MODE,
  iommu_destroy,
  iommu_ioas_alloc,
  iommu_option,
} from "../uapi/iommufd.ts";
import { Ioas } from "./ioas.ts";

export const DEFAULT_IOMMU_PATH = "/dev/iommu";

/** How pinned pages are charged against RLIMIT_MEMLOCK (IOMMU_OPTION_RLIMIT_MODE). */
export type RlimitMode = "user" | "process";

const destroyCmd = iommu_destroy.create();
const ioasAllocCmd = iommu_ioas_alloc.create();
const optionCmd = iommu_option.create();

const IOAS_ALLOC_ERRORS: ErrnoTable = { ENOMEM: "the kernel is out of memory for a new IOAS" };

const DESTROY_ERRORS: ErrnoTable = {
  EBUSY: ({ cmd }) => ({
    message: `object ${cmd!.get("id")} is still in use (a device or hw page table is attached to it; detach first)`,
    argument: "id",
  }),
  ENOENT: ({ cmd }) => ({ message: `no object with id ${cmd!.get("id")} exists in this iommufd`, argument: "id" }),
  otherwise: { argument: "id" },
};

const OPTION_ERRORS: ErrnoTable = {
  EPERM: "changing this option needs CAP_SYS_RESOURCE",
  // iommufd_option_rlimit_mode() refuses once the iommufd holds any object, pinned pages or not.
  EBUSY: ({ cmd }) =>
    cmd!.get("option_id") === IOMMU_OPTION_RLIMIT_MODE
      ? "the rlimit mode can change only while this iommufd holds no object (IOAS, device, page table): set it first"
      : "the kernel refuses to change this option while its object is in use",
  ENOENT: ({ cmd }) => `object ${cmd!.get("object_id")} does not exist`,
};

/** Something the Iommufd must mark dead when it closes. */
interface Owned {
  markGone(): void;
}

export class Iommufd {
  #fd: number;
  readonly #owned = new Set<Owned>();
  readonly #closeOnDispose: boolean;

  private constructor(fd: number, owned: boolean) {
    this.#fd = fd;
    this.#closeOnDispose = owned;
    if (owned) fdFinalizer.register(this, fd, this);
  }

  /** Open the iommufd character device (close-on-exec). */
  static open(path: string = DEFAULT_IOMMU_PATH): Iommufd {
    const fd = openPath(path, O_RDWR, "Iommufd.open", {
      ENOENT: "the running kernel has no iommufd: it needs CONFIG_IOMMUFD=y (run `bunx bun-iommufd doctor`)",
      EACCES: `no permission to open ${path}: run as root, or give this user access to the device node`,
      EPERM: `not permitted to open ${path}: check the device node's permissions and any security module policy`,
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

  /** Allocate an I/O address space (IOMMU_IOAS_ALLOC). */
  createIoas(): Ioas {
    ioasAllocCmd.fill({ size: iommu_ioas_alloc.size });
    this.ioctl(IOMMU_IOAS_ALLOC, ioasAllocCmd, "IOMMU_IOAS_ALLOC", IOAS_ALLOC_ERRORS);
    const ioas = new Ioas(this, ioasAllocCmd.get("out_ioas_id"));
    this.track(ioas);
    return ioas;
  }

  /** IOMMU_DESTROY of any object id (IOAS, hw page table, ...). */
  destroyObject(id: number, operation = "IOMMU_DESTROY"): void {
    destroyCmd.fill({ size: iommu_destroy.size, id });
    this.ioctl(IOMMU_DESTROY, destroyCmd, operation, DESTROY_ERRORS);
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
    optionCmd.fill({ size: iommu_option.size, option_id: optionId, op, object_id: objectId, val64: value });
    this.ioctl(IOMMU_OPTION, optionCmd, "IOMMU_OPTION", OPTION_ERRORS);
    return optionCmd.getBig("val64");
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
