// Connecting as deployed: authorization on, the Brain's identity from `taskpods auth init`. A client with
// no credentials, another installation's, or an unreadable file gets a clear error, never a hang.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { TaskpodsClient, TaskpodsError } from "../src/index.js";
import { Installation, TASKPODS_BIN } from "./harness.js";

let inst: Installation;

before(async () => {
  inst = await Installation.start();
});

after(async () => {
  await inst?.stop();
});

async function refused(kind: string, connect: () => Promise<TaskpodsClient>): Promise<TaskpodsError> {
  try {
    const client = await connect();
    await client.close();
  } catch (e) {
    assert.ok(e instanceof TaskpodsError, `expected a TaskpodsError, got ${e}`);
    assert.equal(e.kind, kind, e.message);
    return e;
  }
  assert.fail(`expected a ${kind} error, the connection was accepted`);
}

/** Runs `body` with TASKPODS_CREDS set to `value` (or unset), restoring it afterwards. */
async function withCredsEnv<T>(value: string | undefined, body: () => Promise<T>): Promise<T> {
  const saved = process.env.TASKPODS_CREDS;
  if (value === undefined) delete process.env.TASKPODS_CREDS;
  else process.env.TASKPODS_CREDS = value;
  try {
    return await body();
  } finally {
    if (saved === undefined) delete process.env.TASKPODS_CREDS;
    else process.env.TASKPODS_CREDS = saved;
  }
}

test("the Brain's credentials, given as a path or as contents, launch and read a task", async () => {
  for (const creds of [inst.creds("brain"), Uint8Array.from(execFileSync("cat", [inst.creds("brain")]))]) {
    const client = await TaskpodsClient.connect(inst.url, { creds });
    try {
      const { taskId } = await client.launch({ script: "echo authorized", timeout_secs: 30 });
      const done = await client.wait(taskId, { timeoutMs: 60_000 });
      assert.equal(done.state, "succeeded");
    } finally {
      await client.close();
    }
  }
});

test("TASKPODS_CREDS is the default, as for the taskpods CLI", async () => {
  const client = await withCredsEnv(inst.creds("brain"), () => TaskpodsClient.connect(inst.url));
  try {
    assert.deepEqual(await client.listActive().then((active) => Array.isArray(active)), true);
  } finally {
    await client.close();
  }
});

test("no credentials: the server refuses, and the error says what to pass", async () => {
  const e = await withCredsEnv(undefined, () => refused("unauthorized", () => TaskpodsClient.connect(inst.url)));
  assert.match(e.message, /refused the connection: it requires credentials.*TASKPODS_CREDS/);
  const explicit = await withCredsEnv(inst.creds("brain"), () =>
    refused("unauthorized", () => TaskpodsClient.connect(inst.url, { creds: false })),
  );
  assert.match(explicit.message, /requires credentials/);
});

test("another installation's credentials are refused and named", async () => {
  const other = join(inst.dir, "other-auth");
  execFileSync(TASKPODS_BIN, ["auth", "init", other], { stdio: "ignore" });
  const path = join(other, "brain.creds");
  const e = await refused("unauthorized", () => TaskpodsClient.connect(inst.url, { creds: path }));
  assert.match(e.message, /does not accept the credentials .*other-auth\/brain\.creds/);
});

test("a missing or garbled credentials file is a credentials error naming the file", async () => {
  const missing = join(inst.dir, "no-such.creds");
  const e = await refused("credentials", () => TaskpodsClient.connect(inst.url, { creds: missing }));
  assert.match(e.message, /cannot read the NATS credentials .*no-such\.creds/);

  const garbled = join(inst.dir, "garbled.creds");
  writeFileSync(garbled, "this is not a creds file\n");
  const g = await refused("credentials", () => TaskpodsClient.connect(inst.url, { creds: garbled }));
  assert.match(g.message, /garbled\.creds/);
});

test("an identity that may not launch (the operator's, read-only plus cancel) is told so", async () => {
  const client = await TaskpodsClient.connect(inst.url, { creds: inst.creds("operator"), replyTimeoutMs: 3_000 });
  try {
    await assert.rejects(client.launch({ script: "echo no", timeout_secs: 30 }), (e: unknown) => {
      assert.ok(e instanceof TaskpodsError, String(e));
      assert.equal(e.kind, "unauthorized", e.message);
      assert.match(e.message, /taskpods\.cmd\.launch/);
      return true;
    });
  } finally {
    await client.close();
  }
});
