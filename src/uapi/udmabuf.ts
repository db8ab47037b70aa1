/** linux/udmabuf.h: turn memfd pages into a dma-buf. Used to show that iommufd refuses such dma-bufs. */
import { IOW, struct } from "./codec.ts";

export const UDMABUF_FLAGS_CLOEXEC = 0x01;

export const udmabuf_create = struct(
  [
    ["memfd", "u32"],
    ["flags", "u32"],
    ["offset", "u64"],
    ["size", "u64"],
  ],
  { cName: "struct udmabuf_create" },
);

export const UDMABUF_CREATE = IOW("u", 0x42, udmabuf_create.size);

export const UDMABUF_LAYOUTS = [udmabuf_create];
export const UDMABUF_REQUESTS: Record<string, number> = { UDMABUF_CREATE };
export const UDMABUF_CONSTANTS: Record<string, number> = { UDMABUF_FLAGS_CLOEXEC };
