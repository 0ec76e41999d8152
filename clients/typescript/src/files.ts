// Files in and out of tasks, as docs/PROTOCOL.md#files describes them: put an input into the object store
// bucket `<prefix>_files` before launching (`<task>/in/<name>`), list and read a task's artifacts
// (`<task>/out/<path>`) afterwards. The same objects the Rust client and the CLI read and write.
//
// These are methods of TaskpodsClient, added here (module augmentation) so the files API lives in its own
// file next to the client rather than inside it.

import type { ObjectInfo, ObjectStore } from "nats";

import { TaskpodsClient } from "./client.js";
import type { Artifact, InputFile } from "./types.js";

/** The longest relative path of an input or artifact, in UTF-8 bytes. */
export const MAX_PATH_BYTES = 1024;
/** The longest single path component, in UTF-8 bytes. */
export const MAX_COMPONENT_BYTES = 255;

/** What kind of failure a {@link FilesError} is. */
export type FilesErrorKind =
  | "bad_path" // an input name or artifact path that is not a clean relative path
  | "not_found" // no such object (never stored, or deleted when the task was reaped)
  | "unreachable" // the bucket could not be opened or NATS failed
  | "corrupt"; // the bytes read do not match the object's digest

/** Every failure of the files API, with its kind. */
export class FilesError extends Error {
  readonly kind: FilesErrorKind;
  /** The object name or path concerned. */
  readonly object: string;

  constructor(kind: FilesErrorKind, object: string, message: string, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "FilesError";
    this.kind = kind;
    this.object = object;
  }
}

const utf8 = new TextEncoder();

/**
 * Why `path` is not a clean relative path (the rules the engine applies: not empty, at most 1024 bytes and
 * 255 per component, no leading `/`, no empty, `.` or `..` component, no control character or `\`), or
 * `undefined` when it is one.
 */
export function pathProblem(path: string): string | undefined {
  if (path.length === 0) return "must not be empty";
  if (utf8.encode(path).length > MAX_PATH_BYTES) return "is too long (at most 1024 bytes, 255 per component)";
  if (path.startsWith("/")) return "must be relative (no leading '/')";
  // deno-lint-ignore no-control-regex
  if (/[\u0000-\u001f\u007f-\u009f\\]/.test(path)) return "must not contain control characters or '\\'";
  for (const component of path.split("/")) {
    if (component === "" || component === "." || component === "..") {
      return "must not contain empty, '.' or '..' components";
    }
    if (utf8.encode(component).length > MAX_COMPONENT_BYTES) {
      return "is too long (at most 1024 bytes, 255 per component)";
    }
  }
  return undefined;
}

function checkPath(path: string): void {
  const problem = pathProblem(path);
  if (problem !== undefined) throw new FilesError("bad_path", path, `${JSON.stringify(path)} ${problem}`);
}

/** The object holding input `name` of `taskId`. */
export function inputObject(taskId: string, name: string): string {
  return `${taskId}/in/${name}`;
}

/** The object holding artifact `path` of `taskId`. */
export function artifactObject(taskId: string, path: string): string {
  return `${taskId}/out/${path}`;
}

/** What can be put as an input: bytes, a web stream, or any (async) iterable of chunks (e.g. a Node stream). */
export type InputData = Uint8Array | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array> | Iterable<Uint8Array>;

function toStream(data: InputData): ReadableStream<Uint8Array> {
  if (data instanceof Uint8Array) {
    return new ReadableStream({
      start(controller) {
        if (data.length > 0) controller.enqueue(data);
        controller.close();
      },
    });
  }
  if (data instanceof ReadableStream) return data;
  const iterator = Symbol.asyncIterator in data
    ? (data as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]()
    : (data as Iterable<Uint8Array>)[Symbol.iterator]();
  return new ReadableStream({
    async pull(controller) {
      const { done, value } = await iterator.next();
      if (done) controller.close();
      else controller.enqueue(value);
    },
  });
}

declare module "./client.js" {
  interface TaskpodsClient {
    /** The files bucket (`<prefix>_files`), opened once. */
    filesBucket(): Promise<ObjectStore>;
    /**
     * Stores `data` as input `name` of `taskId` (object `<task>/in/<name>`) and returns the entry to put
     * in the launch's `inputs`, with its size and digest so the engine checks them. The code finds it at
     * `/tmp/in/<name>`. Mint the task id first (`newTaskId()` or an idempotency key) and launch with it.
     */
    putInput(taskId: string, name: string, data: InputData): Promise<InputFile>;
    /**
     * The artifacts `taskId` stored, in path order, read from the bucket (so those of timed-out and
     * cancelled tasks too). Lists the whole bucket: its cost grows with the number of stored objects.
     */
    artifacts(taskId: string): Promise<Artifact[]>;
    /**
     * The bytes of artifact `path` of `taskId`, checked against the artifact's digest as they arrive (a
     * mismatch is a `corrupt` FilesError).
     */
    getArtifact(taskId: string, path: string): Promise<Uint8Array>;
  }
}

const buckets = new WeakMap<TaskpodsClient, Promise<ObjectStore>>();

TaskpodsClient.prototype.filesBucket = function (this: TaskpodsClient): Promise<ObjectStore> {
  let bucket = buckets.get(this);
  if (bucket === undefined) {
    const name = this.names.filesBucket();
    bucket = this.nc.jetstream().views.os(name).catch((e: unknown) => {
      buckets.delete(this);
      throw new FilesError(
        "unreachable",
        name,
        `files bucket ${name} (has an engine created it?): ${e}`,
        e,
      );
    });
    buckets.set(this, bucket);
  }
  return bucket;
};

TaskpodsClient.prototype.putInput = async function (
  this: TaskpodsClient,
  taskId: string,
  name: string,
  data: InputData,
): Promise<InputFile> {
  checkPath(name);
  const object = inputObject(taskId, name);
  const bucket = await this.filesBucket();
  let info: ObjectInfo;
  try {
    // Putting the same name again replaces the object; an identity that may not purge (a Brain's) leaves
    // the old chunks for the bucket's max age, which the library tolerates.
    info = await bucket.put({ name: object }, toStream(data));
  } catch (e) {
    throw new FilesError("unreachable", object, `storing ${object}: ${e}`, e);
  }
  return { name, object, size: info.size, digest: info.digest };
};

TaskpodsClient.prototype.artifacts = async function (this: TaskpodsClient, taskId: string): Promise<Artifact[]> {
  const prefix = artifactObject(taskId, "");
  const bucket = await this.filesBucket();
  let listed: ObjectInfo[];
  try {
    listed = await bucket.list();
  } catch (e) {
    throw new FilesError("unreachable", prefix, `listing the files bucket: ${e}`, e);
  }
  return listed
    .filter((info) => info.name.startsWith(prefix) && !info.deleted)
    .map((info) => ({ path: info.name.slice(prefix.length), size: info.size, digest: info.digest }))
    .sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
};

TaskpodsClient.prototype.getArtifact = async function (
  this: TaskpodsClient,
  taskId: string,
  path: string,
): Promise<Uint8Array> {
  checkPath(path);
  const object = artifactObject(taskId, path);
  const bucket = await this.filesBucket();
  let result;
  try {
    result = await bucket.get(object);
  } catch (e) {
    throw new FilesError("unreachable", object, `reading ${object}: ${e}`, e);
  }
  if (result === null) {
    throw new FilesError("not_found", object, `no object ${object} in the files bucket`);
  }
  const parts: Uint8Array[] = [];
  let size = 0;
  try {
    const reader = result.data.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      parts.push(value);
      size += value.length;
    }
  } catch (e) {
    throw new FilesError("corrupt", object, `reading ${object}: ${e}`, e);
  }
  const problem = await result.error;
  if (problem) {
    throw new FilesError("corrupt", object, `reading ${object}: ${problem.message}`, problem);
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const part of parts) {
    bytes.set(part, at);
    at += part.length;
  }
  return bytes;
};
