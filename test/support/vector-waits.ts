/**
 * Counts what an interrupt vector handed out from now on. A poller that sleeps for its interrupts
 * gets them from wait() (a sleep in the event loop) or waitBlocking() (a block in poll(2)); one
 * that spins instead leaves them on the eventfd, or drains them with poll(), and sleeps for none.
 */
import type { IrqVector } from "../../src/vfio/irq-vector.ts";

/** The interrupts wait() returned: the sleeps in the event loop. */
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

/**
 * `slept`: the interrupts wait() and the blocks (waitBlocking, blockAfterDrain) returned; `delivered`: those and what poll()
 * returned, i.e. every count read from the eventfd through the vector.
 */
export function countVectorDeliveries(vector: IrqVector): () => { slept: number; delivered: number } {
  const waited = countVectorWaits(vector);
  let blocked = 0;
  let polled = 0;
  // The blocks read the eventfd through this.poll(): those reads are the block's, not poll()'s.
  let inBlock = false;
  const counted = (block: (timeoutMs: number) => number) => (timeoutMs: number) => {
    inBlock = true;
    try {
      const n = block(timeoutMs);
      blocked += n;
      return n;
    } finally {
      inBlock = false;
    }
  };
  vector.waitBlocking = counted(vector.waitBlocking.bind(vector));
  vector.blockAfterDrain = counted(vector.blockAfterDrain.bind(vector));
  const poll = vector.poll.bind(vector);
  vector.poll = () => {
    const n = poll();
    if (!inBlock) polled += n;
    return n;
  };
  return () => ({ slept: waited() + blocked, delivered: waited() + blocked + polled });
}
