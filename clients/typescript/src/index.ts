// @taskpods/client: launch, follow and cancel taskpods tasks from TypeScript (docs/PROTOCOL.md).
//
// - client.ts: TaskpodsClient (launch, get, events, logs, wait, cancel, listActive, listFinished, watchTasks)
// - files.ts: putInput, artifacts, getArtifact (task inputs and artifacts in the object store bucket)
// - names.ts: subject, stream and bucket names under a prefix
// - ids.ts: task ids from idempotency keys (UUIDv5), fresh ids, old 16-byte ids
// - types.ts: the wire types, generated from docs/schema (npm run generate); do not edit by hand

export * from "./client.js";
export * from "./files.js";
export * from "./ids.js";
export { Names } from "./names.js";
export type * from "./types.js";
