// Task ids: the id an idempotency key stands for (UUIDv5, the same namespace as the engine, so the client
// knows the task's id before any reply), fresh ids, and the 16-byte form old events carry.

import { createHash, randomUUID } from "node:crypto";

/** The namespace of ids derived from idempotency keys (docs/PROTOCOL.md, "Which task"). */
export const IDEMPOTENCY_NAMESPACE = "6c1f3a2e-9b7d-4e55-8a10-7a5f2c3d9e01";

function bytesToUuid(bytes: Uint8Array): string {
  const hex = Buffer.from(bytes).toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`;
}

/** The task id of an idempotency key: the same key always names the same task. */
export function taskIdFromIdempotencyKey(key: string): string {
  const namespace = Buffer.from(IDEMPOTENCY_NAMESPACE.replaceAll("-", ""), "hex");
  const digest = createHash("sha1").update(namespace).update(Buffer.from(key, "utf8")).digest();
  const bytes = Uint8Array.from(digest.subarray(0, 16));
  bytes[6] = (bytes[6] & 0x0f) | 0x50; // version 5
  bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
  return bytesToUuid(bytes);
}

/** A fresh task id, for a launch that names neither an id nor an idempotency key. */
export function newTaskId(): string {
  return randomUUID();
}

/**
 * Events stored before ids were strings carry them as 16 raw bytes; this turns such a value into the
 * hyphenated string and leaves everything else alone.
 */
export function idString(value: unknown): unknown {
  return value instanceof Uint8Array && value.length === 16 ? bytesToUuid(value) : value;
}
