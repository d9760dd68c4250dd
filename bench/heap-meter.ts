/**
 * JS heap allocation over a measured loop, for the host-side benchmarks:
 * used-heap growth between collections (V8's GC profiler records the used
 * size before and after each), plus the growth since the last one. What a
 * request path allocates shows up here long before it shows up as time.
 */
import { GCProfiler, getHeapStatistics } from "node:v8";

export interface HeapUse {
  /** Bytes allocated on the JS heap while the meter ran. */
  allocated: number;
  /** Garbage collections in that time. */
  gcs: number;
}

export class HeapMeter {
  private readonly profiler = new GCProfiler();
  private readonly startUsed: number;

  constructor() {
    this.startUsed = getHeapStatistics().used_heap_size;
    this.profiler.start();
  }

  stop(): HeapUse {
    const endUsed = getHeapStatistics().used_heap_size;
    const { statistics } = this.profiler.stop();
    let allocated = 0;
    let after = this.startUsed;
    for (const gc of statistics) {
      allocated += Math.max(0, gc.beforeGC.heapStatistics.usedHeapSize - after);
      after = gc.afterGC.heapStatistics.usedHeapSize;
    }
    allocated += Math.max(0, endUsed - after);
    return { allocated, gcs: statistics.length };
  }
}
