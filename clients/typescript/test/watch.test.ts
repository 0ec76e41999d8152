// Following all of a Brain's own tasks: watchTasks filters the transitions of every task by requester and
// labels, live, including tasks accepted before the watch started.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { type TaskpodsClient, type WatchedEvent } from "../src/index.js";
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

test("watchTasks follows every transition of this Brain's tasks and nothing of anyone else's", async () => {
  const ml = { team: "ml" };
  // Accepted before the watch starts: matched through its accepted event when its next transition comes.
  const before = await client.launch({ script: "sleep 1.5", timeout_secs: 60, requester: "brain-a", labels: ml });
  const seen: WatchedEvent[] = [];
  const reaped = new Set<string>();
  const mine = new Set<string>([before.taskId]);
  let expected = 4;
  const watching = (async () => {
    for await (const e of client.watchTasks({ requester: "brain-a", labels: ml })) {
      seen.push(e);
      if (e.event.kind === "reaped") reaped.add(e.taskId);
      if (mine.size === expected && [...mine].every((t) => reaped.has(t))) return;
    }
  })();
  await new Promise((r) => setTimeout(r, 200)); // the watch's consumer exists before the launches below
  const a1 = await client.launch({ script: "echo a1", timeout_secs: 60, requester: "brain-a", labels: ml });
  const other = await client.launch({ script: "echo b", timeout_secs: 60, requester: "brain-b", labels: ml });
  const unlabelled = await client.launch({ script: "echo c", timeout_secs: 60, requester: "brain-a" });
  const a2 = await client.launch({ script: "exit 2", timeout_secs: 60, requester: "brain-a", labels: { ...ml, x: "y" } });
  const a3 = await client.launch({ script: "sleep 30", timeout_secs: 60, requester: "brain-a", labels: ml });
  mine.add(a1.taskId).add(a2.taskId).add(a3.taskId);
  for await (const { event } of client.events(a3.taskId)) if (event.kind === "running") break;
  await client.cancel(a3.taskId);
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    watching,
    new Promise((_, fail) => {
      timer = setTimeout(() => fail(new Error(`watch incomplete: ${JSON.stringify(seen.map((e) => [e.taskId, e.event.kind]))}`)), 60_000);
    }),
  ]);
  clearTimeout(timer);
  expected = 0;

  const tasks = new Set(seen.map((e) => e.taskId));
  assert.deepEqual([...tasks].sort(), [...mine].sort());
  assert.ok(!tasks.has(other.taskId) && !tasks.has(unlabelled.taskId));
  const kindsOf = (task: string) => seen.filter((e) => e.taskId === task).map((e) => e.event.kind);
  assert.deepEqual(kindsOf(a1.taskId), ["accepted", "scheduled", "running", "succeeded", "reaped"]);
  assert.deepEqual(kindsOf(a2.taskId), ["accepted", "scheduled", "running", "failed", "reaped"]);
  assert.deepEqual(kindsOf(a3.taskId), ["accepted", "scheduled", "running", "cancel_requested", "cancelled", "reaped"]);
  assert.deepEqual(kindsOf(before.taskId).slice(-2), ["succeeded", "reaped"]);
  assert.ok(!kindsOf(before.taskId).includes("accepted"), "only what happened after the watch started");
  for (const e of seen) assert.equal(e.spec?.requester, "brain-a");
  const sequences = seen.map((e) => e.sequence);
  assert.deepEqual(sequences, [...sequences].sort((a, b) => a - b), "in stream order");

  // Resuming from a sequence (the last one a Brain processed, plus one) sees only what came after it.
  const resumeAt = seen[seen.length - 3].sequence;
  const resumed: number[] = [];
  for await (const e of client.watchTasks({ requester: "brain-a", labels: ml }, { from: { sequence: resumeAt } })) {
    resumed.push(e.sequence);
    if (e.sequence === seen[seen.length - 1].sequence) break;
  }
  assert.deepEqual(resumed, sequences.slice(-3));
});
