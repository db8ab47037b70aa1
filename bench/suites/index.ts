/**
 * Every suite of `bun bench`, in run order. A new suite is a file beside this one that calls
 * defineSuite() (see bench/suite.ts), imported here.
 */
import "./map.ts";
import "./heap.ts";
import "./irq.ts";
import "./vmm.ts";
import "./nvme.ts";
