// Task inputs and artifacts through the TypeScript client, against a real nats-server and the real engine
// (local backend: the agent downloads the input into /tmp/in and uploads /tmp/out under bubblewrap). The
// objects the TypeScript client writes are read by the Rust engine and the other way round.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, before, test } from "node:test";

import { FilesError, newTaskId, pathProblem, type TaskpodsClient } from "../src/index.js";
import { Installation } from "./harness.js";

let inst: Installation;
let client: TaskpodsClient;

before(async () => {
  inst = await Installation.start();
  client = await inst.client();
});

after(async () => {
  await inst?.stop();
});

/** Deterministic bytes with every byte value. */
function noise(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

async function filesError(kind: string, run: () => Promise<unknown>): Promise<FilesError> {
  try {
    await run();
  } catch (e) {
    assert.ok(e instanceof FilesError, `expected a FilesError, got ${e}`);
    assert.equal(e.kind, kind, e.message);
    return e;
  }
  assert.fail(`expected a ${kind} error`);
}

test("an input put from TypeScript reaches the code, and its artifacts come back byte-exact", async () => {
  const taskId = newTaskId();
  // 1.5 MiB in chunks of 100 KiB from an async iterable (as a file stream would give them).
  const data = noise(1536 * 1024, 7);
  async function* chunks(): AsyncGenerator<Uint8Array> {
    for (let at = 0; at < data.length; at += 100 * 1024) yield data.subarray(at, at + 100 * 1024);
  }
  const input = await client.putInput(taskId, "data/sample.bin", chunks());
  assert.equal(input.object, `${taskId}/in/data/sample.bin`);
  assert.equal(input.size, data.length);
  const sha = createHash("sha256").update(data).digest("base64url");
  assert.equal(input.digest, `SHA-256=${sha}=`, "the object store's digest (padded base64url)");

  const launched = await client.launch({
    task_id: taskId,
    inputs: [input],
    script:
      "sha256sum /tmp/in/data/sample.bin | cut -d' ' -f1 > /tmp/out/input.sha256 && " +
      "cp /tmp/in/data/sample.bin /tmp/out/copy.bin && mkdir -p /tmp/out/sub/dir && " +
      "echo nested > /tmp/out/sub/dir/note.txt && : > /tmp/out/empty",
    timeout_secs: 60,
  });
  assert.equal(launched.taskId, taskId);
  const view = await client.wait(taskId, { timeoutMs: 60_000 });
  assert.equal(view.state, "succeeded", JSON.stringify(view));

  const listed = await client.artifacts(taskId);
  assert.deepEqual(listed.map((a) => a.path), ["copy.bin", "empty", "input.sha256", "sub/dir/note.txt"]);
  // The list is what the agent reported in the outcome.
  const end = (await client.history(taskId)).find((e) => e.event.kind === "succeeded");
  const outcome = (end?.event as { outcome?: { artifacts?: unknown } } | undefined)?.outcome;
  assert.deepEqual(outcome?.artifacts, listed);

  const copy = await client.getArtifact(taskId, "copy.bin");
  assert.equal(Buffer.compare(Buffer.from(copy), Buffer.from(data)), 0, "copy.bin is the input, byte for byte");
  const seen = new TextDecoder().decode(await client.getArtifact(taskId, "input.sha256")).trim();
  assert.equal(seen, createHash("sha256").update(data).digest("hex"), "the code read the exact input");
  assert.equal(new TextDecoder().decode(await client.getArtifact(taskId, "sub/dir/note.txt")), "nested\n");
  assert.equal((await client.getArtifact(taskId, "empty")).length, 0);
});

test("a missing input fails the task with input_missing before its code runs", async () => {
  const taskId = newTaskId();
  await client.launch({
    task_id: taskId,
    inputs: [{ name: "absent.csv", object: `${taskId}/in/absent.csv` }],
    script: "echo ran > /tmp/out/ran.txt",
    timeout_secs: 60,
  });
  const view = await client.wait(taskId, { timeoutMs: 60_000 });
  assert.equal(view.state, "failed");
  assert.equal((view as { reason?: { code?: string } }).reason?.code, "input_missing", JSON.stringify(view));
  assert.deepEqual(await client.artifacts(taskId), []);
});

test("bad names and paths are refused before anything is stored, and a missing artifact is not_found", async () => {
  const taskId = newTaskId();
  for (const bad of ["", "/etc/passwd", "../x", "a/../../b", "a//b", "./a", "a\u0000b", "a\\b", "x".repeat(256)]) {
    assert.notEqual(pathProblem(bad), undefined, JSON.stringify(bad));
    await filesError("bad_path", () => client.putInput(taskId, bad, new Uint8Array([1])));
    await filesError("bad_path", () => client.getArtifact(taskId, bad));
  }
  assert.equal(pathProblem("reports/2026/summary é.csv"), undefined);
  const missing = await filesError("not_found", () => client.getArtifact(taskId, "nothing.txt"));
  assert.equal(missing.object, `${taskId}/out/nothing.txt`);
  // Nothing was stored under the task.
  const bucket = await client.filesBucket();
  const names = (await bucket.list()).map((i) => i.name).filter((n) => n.startsWith(`${taskId}/`));
  assert.deepEqual(names, []);
});
