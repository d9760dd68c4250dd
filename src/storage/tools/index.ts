/**
 * Disk tools: generic operations over any format driver (convert, merge,
 * compact, info, check, resize, set-parent). Long operations are async,
 * chunked, report progress and can be cancelled without leaving damage.
 */
export { convertDisk, type ConvertOptions, type ConvertResult } from "./convert.js";
export { mergeDisk, type MergeTarget, type MergeResult } from "./merge.js";
export { compactDisk, type CompactResult } from "./compact.js";
export { infoDisk, checkDisk, type CheckResult, type LayerCheck } from "./inspect.js";
export { resizeDisk, setParentDisk, type ResizeResult } from "./reshape.js";
export { DiskOperationCancelled, type DiskOperationOptions } from "./operation.js";
