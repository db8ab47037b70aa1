/**
 * Counts what an interrupt vector's wait() returned from now on: the interrupts a poller slept
 * for (a poller that spins instead leaves them on the eventfd and waits for none).
 */
import type { IrqVector } from "../../src/vfio/irq-vector.ts";

export function countVectorWaits(vector: IrqVector): () => number {
  let waited = 0;
  const wait = vector.wait.bind(vector);
  vector.wait = async (options) => {
    const n = await wait(options);
    waited += n;
    return n;
  };
  return () => waited;
}
