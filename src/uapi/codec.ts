/**
 * A small struct codec: a field table gives each field's type, the layout follows C's natural
 * alignment rules (which is what the kernel's UAPI headers rely on), and encoding happens in
 * place in a reusable, pinned buffer whose address is taken once.
 *
 * The layout test compiles C against the real kernel headers and compares every offset and size
 * computed here, so a wrong table fails a test rather than corrupting an ioctl.
 */
import { ptr } from "bun:ffi";

export type FieldType = "u8" | "u16" | "u32" | "s32" | "u64";

const SIZE: Record<FieldType, number> = { u8: 1, u16: 2, u32: 4, s32: 4, u64: 8 };

/** `[name, type]` or `[name, type, count]` for a fixed array. */
export type FieldSpec = readonly [string, FieldType] | readonly [string, FieldType, number];

export interface Field {
  readonly name: string;
  readonly type: FieldType;
  readonly offset: number;
  readonly size: number;
  readonly count: number;
}

export interface LayoutOptions {
  /** C name for the layout test, e.g. `struct iommu_ioas_map`. */
  cName: string;
  /**
   * Fields that live in a C union or nested struct, mapped to the C member path used by the
   * layout test (`check_map.iova`). Offsets still come from the table, so a table entry may
   * start at a given offset with `at`.
   */
  cPath?: Record<string, string>;
  /** Place fields at fixed offsets (unions): name -> offset. Others follow in order. */
  at?: Record<string, number>;
  /** Byte size to use instead of the computed one (a union larger than the fields we use). */
  size?: number;
}

const TWO_32 = 2 ** 32;

export class StructLayout<F extends string = string> {
  readonly cName: string;
  readonly size: number;
  readonly align: number;
  readonly fields: Readonly<Record<F, Field>>;
  readonly fieldList: readonly Field[];
  /**
   * Index of each field in {@link StructBuffer.u32} (offset / 4), for hot paths that write
   * command words directly. Fields not on a 4-byte boundary have none.
   */
  readonly words: Readonly<Record<F, number>>;
  readonly cPath: Readonly<Record<string, string>>;

  constructor(specs: readonly FieldSpec[], options: LayoutOptions) {
    this.cName = options.cName;
    this.cPath = options.cPath ?? {};
    let offset = 0;
    let align = 1;
    const list: Field[] = [];
    for (const spec of specs) {
      const [name, type] = spec;
      const count = spec[2] ?? 1;
      const size = SIZE[type];
      const fixed = options.at?.[name];
      offset = fixed ?? Math.ceil(offset / size) * size;
      list.push({ name, type, offset, size, count });
      offset += size * count;
      align = Math.max(align, size);
    }
    const end = Math.max(offset, ...list.map((f) => f.offset + f.size * f.count));
    this.size = options.size ?? Math.ceil(end / align) * align;
    this.align = align;
    this.fieldList = list;
    this.fields = Object.fromEntries(list.map((f) => [f.name, f])) as Record<F, Field>;
    this.words = Object.fromEntries(
      list.filter((f) => f.offset % 4 === 0 && f.size >= 4).map((f) => [f.name, f.offset / 4]),
    ) as Record<F, number>;
  }

  /** A fresh zeroed buffer for this layout, with its address cached. */
  create(extraBytes = 0): StructBuffer<F> {
    return new StructBuffer(this, extraBytes);
  }
}

/** Define a layout; `F` is inferred from the field names. */
export function struct<const S extends readonly FieldSpec[]>(
  specs: S,
  options: LayoutOptions,
): StructLayout<S[number][0]> {
  return new StructLayout(specs, options);
}

/**
 * One reusable instance of a struct. `address` is stable for the buffer's life, so hot paths pass
 * it to ioctl as a plain number without asking bun:ffi again.
 */
export class StructBuffer<F extends string = string> {
  readonly layout: StructLayout<F>;
  readonly bytes: Uint8Array;
  readonly view: DataView;
  /** 32-bit words of the struct: hot paths write fields by word index (offset / 4). */
  readonly u32: Uint32Array;
  readonly address: number;

  constructor(layout: StructLayout<F>, extraBytes = 0) {
    this.layout = layout;
    // A dedicated ArrayBuffer (not a slice of a pool) keeps the address valid for as long as this
    // object lives; rounding to 8 keeps u64 fields aligned for the kernel's copy_from_user.
    const storage = new ArrayBuffer(Math.ceil((layout.size + extraBytes) / 8) * 8);
    this.bytes = new Uint8Array(storage);
    this.view = new DataView(storage);
    this.u32 = new Uint32Array(storage);
    this.address = ptr(this.bytes);
  }

  clear(): this {
    this.bytes.fill(0);
    return this;
  }

  /** Write a field. u64 takes a number (exact below 2^53) or a bigint (any 64-bit value). */
  set(name: F, value: number | bigint, index = 0): this {
    const field = this.layout.fields[name];
    writeField(this.view, field.type, field.offset + index * field.size, value);
    return this;
  }

  /** Read a field as a number. u64 values above 2^53 lose precision: use {@link getBig}. */
  get(name: F, index = 0): number {
    const field = this.layout.fields[name];
    return readField(this.view, field.type, field.offset + index * field.size);
  }

  getBig(name: F, index = 0): bigint {
    const field = this.layout.fields[name];
    const at = field.offset + index * field.size;
    return field.type === "u64" ? this.view.getBigUint64(at, true) : BigInt(readField(this.view, field.type, at));
  }

  /** Fill several fields at once, starting from zero: the kernel rejects non-zero reserved bytes. */
  fill(values: Partial<Record<F, number | bigint>>): this {
    this.clear();
    for (const name in values) {
      const value = values[name];
      if (value !== undefined) this.set(name, value);
    }
    return this;
  }
}

export function writeField(view: DataView, type: FieldType, at: number, value: number | bigint): void {
  switch (type) {
    case "u8":
      view.setUint8(at, Number(value));
      return;
    case "u16":
      view.setUint16(at, Number(value), true);
      return;
    case "u32":
      view.setUint32(at, Number(value), true);
      return;
    case "s32":
      view.setInt32(at, Number(value), true);
      return;
    case "u64":
      if (typeof value === "bigint") {
        view.setBigUint64(at, BigInt.asUintN(64, value), true);
      } else {
        // Two 32-bit halves avoid a BigInt allocation per call on the hot path.
        view.setUint32(at, value % TWO_32, true);
        view.setUint32(at + 4, Math.floor(value / TWO_32), true);
      }
  }
}

export function readField(view: DataView, type: FieldType, at: number): number {
  switch (type) {
    case "u8":
      return view.getUint8(at);
    case "u16":
      return view.getUint16(at, true);
    case "u32":
      return view.getUint32(at, true);
    case "s32":
      return view.getInt32(at, true);
    case "u64":
      return view.getUint32(at + 4, true) * TWO_32 + view.getUint32(at, true);
  }
}

/**
 * Write a u64 as two words (little-endian) without a BigInt for exact numbers. Small integers
 * (every IOVA, length and offset below 2 GiB) take a path with no floating-point operation: in
 * the TCG test guest each one is a call into QEMU's soft-float library, and the divide below
 * and getU64's multiply cost a 4 KiB mapFile+unmap pair there 500-540 ns of JS instead of 340.
 * The rest is out of line so that this stays small enough for the JIT to inline at every encoder
 * of the per-I/O path (guest: 339-444 -> 296-313 ns per pair; the same as writing the encoders'
 * fields into mapFile and unmap themselves, without a second encoder).
 */
export function putU64(words: Uint32Array, index: number, value: number | bigint): void {
  if (typeof value === "number" && (value | 0) === value) {
    words[index] = value;
    words[index + 1] = 0;
  } else {
    putWideU64(words, index, value);
  }
}

function putWideU64(words: Uint32Array, index: number, value: number | bigint): void {
  if (typeof value === "number") {
    words[index] = value >>> 0;
    words[index + 1] = (value / TWO_32) >>> 0;
  } else {
    words[index] = Number(value & 0xffffffffn);
    words[index + 1] = Number((value >> 32n) & 0xffffffffn);
  }
}

/** Read a u64 from two words: a number when exact (below 2^53), else a bigint. */
export function getU64(words: Uint32Array, index: number): number | bigint {
  const high = words[index + 1]!;
  // An integer, not high * 2^32 + low (a double): callers keep doing integer arithmetic with it.
  if (high === 0) return words[index]!;
  if (high < 0x200000) return high * TWO_32 + words[index]!;
  return (BigInt(high) << 32n) | BigInt(words[index]!);
}

/** _IO(type, nr): iommufd and VFIO encode no size or direction in their request numbers. */
export function IO(type: string, nr: number): number {
  return (type.charCodeAt(0) << 8) | nr;
}

/** _IOW(type, nr, size). */
export function IOW(type: string, nr: number, size: number): number {
  return ((1 << 30) | (size << 16) | (type.charCodeAt(0) << 8) | nr) >>> 0;
}
