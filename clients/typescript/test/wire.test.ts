// The wire of a real engine, read as a Brain in TypeScript reads it: raw msgpack decoded with
// @msgpack/msgpack (not our decoder), ids checked to be hyphenated strings, and every message and view
// validated with Ajv against docs/schema (generated from the Rust types).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { decode, encode } from "@msgpack/msgpack";
import { createInbox, headers, type NatsConnection } from "nats";

import { type TaskpodsClient } from "../src/index.js";
import { Installation } from "./harness.js";
import { assertValid } from "./schemas.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

let inst: Installation;
let nc: NatsConnection;
let client: TaskpodsClient;

before(async () => {
  inst = await Installation.start();
  nc = await inst.connect();
  client = await inst.client();
});

after(async () => {
  await inst?.stop();
});

/** Publishes a raw msgpack command (no Content-Type: msgpack) and returns the decoded msgpack reply. */
async function rawCommand(subject: string, msgId: string, payload: Uint8Array): Promise<Record<string, unknown>> {
  const inbox = createInbox();
  const sub = nc.subscribe(inbox, { max: 1, timeout: 10_000 });
  const h = headers();
  h.set("Taskpods-Reply-To", inbox);
  await nc.jetstream().publish(subject, payload, { headers: h, msgID: msgId });
  for await (const m of sub) {
    assert.equal(m.headers?.get("Content-Type") ?? "application/msgpack", "application/msgpack");
    return decode(m.data) as Record<string, unknown>;
  }
  throw new Error("no reply");
}

function idsAreStrings(value: Record<string, unknown>, where: string): void {
  for (const field of ["id", "task", "task_id"]) {
    if (field in value) {
      assert.ok(typeof value[field] === "string" && UUID.test(value[field] as string), `${where}: ${field} is ${value[field]}`);
    }
  }
}

test("every message kind of a real engine decodes with @msgpack/msgpack and matches its schema", async () => {
  // Agent messages travel on the command stream and core subjects: watch them go by.
  const agentMessages: Record<string, unknown>[] = [];
  const agentSub = nc.subscribe("taskpods.cmd.agent.>", {
    callback: (_e, m) => agentMessages.push(decode(m.data) as Record<string, unknown>),
  });
  const heartbeatSub = nc.subscribe("taskpods.agent.*.heartbeat", {
    callback: (_e, m) => agentMessages.push(decode(m.data) as Record<string, unknown>),
  });

  // Replies, in msgpack because the commands are msgpack.
  const replies: Record<string, unknown>[] = [];
  const launch = (key: string, fields: Record<string, unknown>) =>
    rawCommand("taskpods.cmd.launch", key, encode({ idempotency_key: key, timeout_secs: 60, ...fields }));
  const ok = await launch("wire-ok", {
    script: "echo '::progress:: 50% half'; sleep 0.3; echo '{\"n\": 1}' > /tmp/result.json",
    labels: { suite: "wire" },
    requester: "brain-wire",
  });
  replies.push(ok);
  replies.push(await launch("wire-fail", { script: "exit 3" }));
  replies.push(await launch("wire-timeout", { script: "sleep 30", timeout_secs: 1 }));
  replies.push(await launch("wire-rejected", { script: "x", timeout_secs: 99999 }));
  const cancelled = await launch("wire-cancel", { script: "sleep 30" });
  replies.push(cancelled);
  const cancelTask = cancelled.task_id as string;
  for await (const { event } of client.events(cancelTask)) if (event.kind === "running") break;
  // The active view while it runs.
  const active = await client.listActive();
  assert.ok(active.length > 0);
  for (const view of active) assertValid("active-view", view, "active view");
  replies.push(await rawCommand(`taskpods.cmd.cancel.${cancelTask}`, "wire-cancel-1", encode({ task_id: cancelTask })));
  replies.push(await rawCommand(`taskpods.cmd.cancel.${cancelTask}`, "wire-cancel-2", encode({ task_id: cancelTask })));
  replies.push(await rawCommand("taskpods.cmd.launch", "wire-garbage", Uint8Array.from([0xc1, 0xff, 0x00])));

  const outcomes = replies.map((r) => r.outcome).sort();
  assert.deepEqual(outcomes, ["applied", "applied", "applied", "applied", "applied", "invalid", "refused", "rejected"]);
  for (const [i, reply] of replies.entries()) {
    idsAreStrings(reply, `reply ${i}`);
    assertValid("command-reply", reply, `reply ${i} (${reply.outcome})`);
  }

  // Hello from a would-be agent of a task that has ended: the engine says stop.
  const tasks = replies.filter((r) => typeof r.task_id === "string").map((r) => r.task_id as string);
  for (const task of new Set(tasks)) await client.wait(task, { timeoutMs: 60_000 });
  const hello = await nc.request(`taskpods.agent.${ok.task_id}.hello`, encode({ report: "hello", agent_version: "0.0.0-test" }), {
    timeout: 10_000,
  });
  const answer = decode(hello.data) as Record<string, unknown>;
  assert.equal(answer.answer, "stop");
  assertValid("hello-reply", answer, "hello reply");

  // Every event in the stream, as stored.
  const jsm = await nc.jetstreamManager();
  const info = await jsm.streams.info("TASKPODS_EVT");
  const kinds = new Set<string>();
  for (let seq = 1; seq <= info.state.last_seq; seq++) {
    const m = await jsm.streams.getMessage("TASKPODS_EVT", { seq });
    const event = decode(m.data) as Record<string, unknown>;
    idsAreStrings(event, `event ${seq}`);
    assert.equal(m.header.get("Taskpods-Kind"), event.kind);
    assertValid("event", event, `event ${seq} (${event.kind})`);
    kinds.add(event.kind as string);
  }
  for (const kind of ["accepted", "rejected", "scheduled", "running", "progress", "cancel_requested", "succeeded", "failed", "timed_out", "cancelled"]) {
    assert.ok(kinds.has(kind), `no ${kind} event among ${[...kinds]}`);
  }

  // Agent reports as the real agent sent them.
  agentSub.unsubscribe();
  heartbeatSub.unsubscribe();
  const reports = new Set(agentMessages.map((m) => m.report));
  for (const report of ["progress", "result", "heartbeat"]) assert.ok(reports.has(report), `no ${report} report: ${[...reports]}`);
  for (const [i, m] of agentMessages.entries()) assertValid("agent-report", m, `agent report ${i} (${m.report})`);

  // The views, as UIs read them (JSON in KV).
  for (const task of new Set(tasks)) {
    const view = await client.get(task);
    assertValid("task-view", view, `task view of ${task}`);
    assertValid("history-view", await client.timeline(task), `history of ${task}`);
  }
  const finished = await client.listFinished({ limit: 10 });
  assert.equal(finished.entries.length, new Set(tasks).size);
  for (const entry of finished.entries) assertValid("finished-view", entry, "finished entry");
});
