// The TypeScript client against a real nats-server and the real engine (local backend, bubblewrap).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { TaskpodsError, type StoredEvent, taskIdFromIdempotencyKey, type TaskpodsClient } from "../src/index.js";
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

async function rejectsWith(kind: string, run: () => Promise<unknown>): Promise<TaskpodsError> {
  try {
    await run();
  } catch (e) {
    assert.ok(e instanceof TaskpodsError, `expected a TaskpodsError, got ${e}`);
    assert.equal(e.kind, kind, e.message);
    return e;
  }
  assert.fail(`expected a ${kind} error`);
}

test("ids from idempotency keys match the engine's (UUIDv5, pinned)", () => {
  // The same value the Rust ids test pins (computed independently with Python's uuid5).
  assert.equal(taskIdFromIdempotencyKey("brain-42/step-7"), "b93a59e2-5a88-5b05-a0d5-9b8f3e41016f");
});

test("launch is idempotent and get reads its own write", async () => {
  const launch = {
    idempotency_key: "ts-idem-1",
    script: "echo hi",
    timeout_secs: 60,
    labels: { team: "ml" },
    requester: "brain-ts",
  };
  const first = await client.launch(launch);
  assert.equal(first.taskId, taskIdFromIdempotencyKey("ts-idem-1"));
  assert.equal(first.created, true);
  assert.deepEqual(first.state, { state: "accepted" });
  assert.ok(first.sequence > 0);

  const view = await client.get(first.taskId, { atLeast: first.sequence });
  assert.ok(view !== undefined);
  assert.ok(view.seq >= first.sequence);
  assert.equal(view.task, first.taskId);
  assert.equal(view.requester, "brain-ts");
  assert.deepEqual(view.labels, { team: "ml" });

  // The same key again, later: the same task, nothing new started.
  const again = await client.launch(launch);
  assert.equal(again.taskId, first.taskId);
  assert.equal(again.created, false);
  assert.equal(again.sequence, first.sequence);
  await client.wait(first.taskId, { timeoutMs: 60_000 });
  const starts = (await client.history(first.taskId)).filter((e) => e.event.kind === "accepted");
  assert.equal(starts.length, 1);

  assert.equal(await client.get("0193a5b6-1b2c-7def-8123-000000000000"), undefined);
});

test("a script's events and output follow live; wait returns the outcome", async () => {
  const script = [
    "for i in 1 2 3; do echo \"step $i\"; echo \"::progress:: $((i*33))% step $i\"; sleep 0.3; done",
    "echo oops >&2",
    "echo '{\"answer\": 42}' > /tmp/result.json",
  ].join("\n");
  const { taskId } = await client.launch({ script, timeout_secs: 60 });

  const collected: StoredEvent[] = [];
  const following = (async () => {
    for await (const stored of client.events(taskId, { untilEnd: true })) collected.push(stored);
  })();
  let stdout = "";
  let stderr = "";
  const kinds: string[] = [];
  for await (const chunk of client.logs(taskId)) {
    kinds.push(chunk.kind);
    if (chunk.kind === "stdout") stdout += new TextDecoder().decode(chunk.data);
    if (chunk.kind === "stderr") stderr += new TextDecoder().decode(chunk.data);
  }
  const view = await client.wait(taskId, { timeoutMs: 60_000 });
  await following;

  assert.match(stdout, /step 1\n(.|\n)*step 3\n/);
  assert.equal(stderr, "oops\n");
  assert.equal(kinds.at(-1), "end");
  const eventKinds = collected.map((e) => e.event.kind).filter((k) => k !== "progress");
  assert.deepEqual(eventKinds, ["accepted", "scheduled", "running", "succeeded"]);
  assert.ok(collected.some((e) => e.event.kind === "progress"));
  const sequences = collected.map((e) => e.sequence);
  assert.deepEqual(sequences, [...sequences].sort((a, b) => a - b));

  assert.equal(view.state, "succeeded");
  assert.equal(view.exit_code, 0);
  assert.deepEqual(view.result, { answer: 42 });
  assert.match(view.output_tail ?? "", /step 3/);

  // Read again later, without following: the same output, from the start.
  let again = "";
  for await (const chunk of client.logs(taskId, { follow: false })) {
    if (chunk.kind === "stdout") again += new TextDecoder().decode(chunk.data);
  }
  assert.equal(again, stdout);
});

test("a failing script ends failed with its exit code", async () => {
  const { taskId } = await client.launch({ script: "echo bad input >&2; exit 3", timeout_secs: 60 });
  const view = await client.wait(taskId, { timeoutMs: 60_000 });
  assert.equal(view.state, "failed");
  assert.deepEqual((view as { reason?: unknown }).reason, { code: "non_zero_exit", exit_code: 3 });
  assert.equal(view.exit_code, 3);
  assert.match(view.output_tail ?? "", /bad input/);
});

test("an invalid launch is rejected with every problem, also when repeated", async () => {
  const launch = { idempotency_key: "ts-bad-1", script: "echo", timeout_secs: 3600, env: { "1BAD": "x" } };
  for (let attempt = 0; attempt < 2; attempt++) {
    const e = await rejectsWith("rejected", () => client.launch(launch));
    assert.equal(e.taskId, taskIdFromIdempotencyKey("ts-bad-1"));
    const fields = (e.problems ?? []).map((p) => p.field).sort();
    assert.deepEqual(fields, ["env.1BAD", "timeout_secs"]);
    assert.match(e.message, /at most 1800 seconds/);
  }
});

test("cancel stops a running task; a second cancel and an unknown task are refused", async () => {
  const { taskId } = await client.launch({ script: "sleep 60", timeout_secs: 120 });
  for await (const { event } of client.events(taskId)) {
    if (event.kind === "running") break;
  }
  const active = await client.listActive();
  assert.ok(active.some((v) => v.task === taskId), "a running task is in the active list");

  const state = await client.cancel(taskId, { reason: "the user changed their mind", requester: "brain-ts" });
  assert.deepEqual(state, { state: "cancelling" });
  const view = await client.wait(taskId, { timeoutMs: 60_000 });
  assert.equal(view.state, "cancelled");
  assert.equal(view.cancel?.reason, "the user changed their mind");

  const again = await rejectsWith("refused", () => client.cancel(taskId));
  assert.match(again.message, /ended|cancel/);
  await rejectsWith("refused", () => client.cancel("0193a5b6-1b2c-7def-8123-0000000000ff"));
});

test("listFinished pages newest first without gaps or repeats", async () => {
  const ids: string[] = [];
  for (let i = 0; i < 3; i++) {
    const { taskId } = await client.launch({ script: `echo ${i}`, timeout_secs: 60 });
    await client.wait(taskId, { timeoutMs: 60_000 });
    ids.push(taskId);
  }
  const seen: string[] = [];
  let before: number | undefined;
  for (let page = 0; page < 20; page++) {
    const { entries, next } = await client.listFinished({ before, limit: 2 });
    assert.ok(entries.length <= 2);
    seen.push(...entries.map((e) => e.task));
    if (next === undefined) break;
    before = next;
  }
  assert.equal(new Set(seen).size, seen.length, "no task twice");
  // The three just finished are the newest three, newest first.
  assert.deepEqual(seen.slice(0, 3), [...ids].reverse());
  const first = await client.listFinished({ limit: 1 });
  assert.equal(first.entries[0].task, ids[2]);
  assert.equal(first.entries[0].state, "succeeded");
});
