// `taskpods mcp` driven by the official MCP TypeScript SDK as the client, over stdio, against a real
// engine with authorization on: the server is started exactly as clients/mcp/mcp.json (the README's
// snippet) says, the Brain's credentials where `scripts/run` writes them.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

import { toolCaller } from "./tools.js";
import { Installation, REPO, TASKPODS_BIN } from "./harness.js";

let inst: Installation;
let mcp: Client;

const { call, ok } = toolCaller(() => mcp);

interface ServerConfig {
  command: string;
  args: string[];
  env: Record<string, string>;
}

const printed: ServerConfig = JSON.parse(readFileSync(join(REPO, "clients/mcp/mcp.json"), "utf8")).mcpServers.taskpods;

/** The server's environment: `env` over a user's (no TASKPODS_CREDS of its own), the test's own NATS, the built binary first on PATH. */
function serverEnv(env: Record<string, string>, home: string): Record<string, string> {
  const base: Record<string, string> = { ...(process.env as Record<string, string>), HOME: home };
  delete base.TASKPODS_CREDS;
  return { ...base, ...env, TASKPODS_NATS_URL: inst.url, PATH: `${dirname(TASKPODS_BIN)}:${process.env.PATH}` };
}

before(async () => {
  inst = await Installation.start();
  mcp = new Client({ name: "taskpods-test", version: "0.0.0" });
  await mcp.connect(
    new StdioClientTransport({
      command: printed.command,
      args: printed.args,
      env: serverEnv(printed.env, inst.home()),
      stderr: "inherit",
    }),
  );
});

after(async () => {
  await mcp?.close();
  await inst?.stop();
});

test("the README's MCP configuration is clients/mcp/mcp.json", () => {
  const snippet = readFileSync(join(REPO, "clients/mcp/mcp.json"), "utf8");
  assert.ok(readFileSync(join(REPO, "README.md"), "utf8").includes(snippet.trim()));
});

/** Starts the server with `env` (over the printed one) and returns what it said on stderr when the SDK's connect failed. */
async function refusedStart(env: Record<string, string | undefined>): Promise<string> {
  const merged = serverEnv({ ...printed.env }, inst.home());
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) delete merged[k];
    else merged[k] = v;
  }
  const transport = new StdioClientTransport({ command: printed.command, args: printed.args, env: merged, stderr: "pipe" });
  let stderr = "";
  transport.stderr?.on("data", (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const client = new Client({ name: "taskpods-test-refused", version: "0.0.0" });
  await assert.rejects(client.connect(transport, { timeout: 60_000 }));
  await client.close().catch(() => {});
  return stderr;
}

test("without the Brain's credentials the server stops at once and says what to pass", async () => {
  const stderr = await refusedStart({ TASKPODS_CREDS: undefined });
  assert.match(stderr, /refused the connection: it requires credentials: pass --creds or set TASKPODS_CREDS/);
});

test("another installation's credentials, or a missing file, are named in the error", async () => {
  const other = join(inst.dir, "other-auth");
  execFileSync(TASKPODS_BIN, ["auth", "init", other], { stdio: "ignore" });
  const stranger = await refusedStart({ TASKPODS_CREDS: join(other, "brain.creds") });
  assert.match(stranger, /does not accept the credentials .*other-auth\/brain\.creds/);
  const missing = await refusedStart({ HOME: join(inst.dir, "nobody") });
  assert.match(missing, /cannot read the NATS credentials .*nobody\/\.local\/share\/taskpods\/auth\/brain\.creds/);
});

test("the tools are listed with descriptions that tell a model what the sandbox can do", async () => {
  assert.equal(mcp.getServerVersion()?.name, "taskpods");
  const { tools } = await mcp.listTools();
  assert.deepEqual(tools.map((t) => t.name).sort(), ["cancel_task", "get_task", "launch_task", "list_tasks", "task_output"]);
  const launch = tools.find((t) => t.name === "launch_task");
  assert.ok(launch);
  for (const fact of ["NO network", "/tmp", "1800 = 30 minutes", "idempotency_key"]) {
    assert.ok(launch.description?.includes(fact), `launch_task's description says ${fact}`);
  }
  assert.deepEqual(Object.keys(launch.inputSchema.properties ?? {}).sort(), [
    "env",
    "goal",
    "idempotency_key",
    "labels",
    "script",
    "timeout_secs",
    "wait",
    "wait_secs",
  ]);
  assert.match(mcp.getInstructions() ?? "", /no network/);
});

test("launch_task with wait returns the outcome and the output tail; the same key returns the same task", async () => {
  const args = {
    script: "echo hello from the sandbox; echo '{\"sum\": 5}' > /tmp/result.json; echo warn >&2",
    timeout_secs: 60,
    labels: { conversation: "c1" },
    idempotency_key: "conv-1/turn-1/step-1",
    wait: true,
  };
  const done = await ok("launch_task", args);
  assert.equal(done.state, "succeeded");
  assert.equal(done.exit_code, 0);
  assert.deepEqual(done.result, { sum: 5 });
  assert.match(String(done.output_tail), /hello from the sandbox/);
  assert.equal(done.requester, "my-assistant");
  assert.deepEqual(done.labels, { conversation: "c1" });
  assert.equal(done.created, true);

  const again = await ok("launch_task", args);
  assert.equal(again.task_id, done.task_id);
  assert.equal(again.created, false);
  assert.equal(again.state, "succeeded");

  const got = await ok("get_task", { task_id: done.task_id });
  assert.equal(got.state, "succeeded");
  assert.equal(got.exit_code, 0);
});

test("task_output pages through long output and says when there is more", async () => {
  const started = await ok("launch_task", {
    script: "i=0; while [ $i -lt 300 ]; do printf 'line %04d 0123456789\\n' $i; i=$((i+1)); done",
    timeout_secs: 60,
    wait: true,
  });
  assert.equal(started.state, "succeeded");
  let text = "";
  let offset = 0;
  let pages = 0;
  for (;;) {
    const page = await ok("task_output", { task_id: started.task_id, offset, max_bytes: 2000 });
    assert.equal(page.stored_bytes, 300 * 21); // "line 0000 0123456789\n"
    text += page.text;
    pages++;
    if (page.next_offset === undefined) {
      assert.equal(page.more_stored, false);
      assert.equal(page.output_complete, true);
      break;
    }
    assert.match(String(page.note), /call task_output again with offset=/);
    offset = page.next_offset as number;
  }
  assert.equal(pages, 4);
  const lines = text.trimEnd().split("\n");
  assert.equal(lines.length, 300);
  assert.equal(lines[299], "line 0299 0123456789");
});

test("cancel_task stops a running task; list_tasks shows it running, then finished", async () => {
  const started = await ok("launch_task", { script: "echo started; sleep 60", timeout_secs: 120 });
  assert.equal(started.created, true);
  const task = started.task_id as string;
  for (let i = 0; ; i++) {
    if ((await ok("get_task", { task_id: task })).state === "running") break;
    assert.ok(i < 200, "the task runs within 20 s");
    await new Promise((r) => setTimeout(r, 100));
  }
  const active = await ok("list_tasks", { which: "active" });
  assert.ok((active.tasks as { task: string }[]).some((t) => t.task === task));
  const still = await ok("task_output", { task_id: task });
  assert.equal(still.output_complete, false);
  assert.match(String(still.note), /still running/);

  const cancelled = await ok("cancel_task", { task_id: task, reason: "not needed any more" });
  assert.equal(cancelled.state, "cancelling");
  for (let i = 0; ; i++) {
    if ((await ok("get_task", { task_id: task })).state === "cancelled") break;
    assert.ok(i < 200, "cancelled within 20 s");
    await new Promise((r) => setTimeout(r, 100));
  }
  const finished = await ok("list_tasks", { which: "finished", limit: 1 });
  assert.equal((finished.tasks as { task: string }[])[0].task, task);

  const again = await call("cancel_task", { task_id: task });
  assert.equal(again.isError, true);
  assert.match(again.content[0].text, /ended/);
});

test("mistakes come back as tool errors a model can act on", async () => {
  const rejected = await call("launch_task", { script: "echo", timeout_secs: 7200, env: { "bad name": "x" } });
  assert.equal(rejected.isError, true);
  assert.match(rejected.content[0].text, /timeout_secs: .*30 minutes/);
  assert.match(rejected.content[0].text, /env\.bad name/);

  const unknown = await call("get_task", { task_id: "0193a5b6-1b2c-7def-8123-0000000000ee" });
  assert.equal(unknown.isError, true);
  assert.match(unknown.content[0].text, /there is no task/);

  const notAnId = await call("task_output", { task_id: "the last one" });
  assert.equal(notAnId.isError, true);
  assert.match(notAnId.content[0].text, /not a task id/);

  const typo = await call("launch_task", { scirpt: "echo" });
  assert.equal(typo.isError, true);
  assert.match(typo.content[0].text, /unknown field `scirpt`/);

  await assert.rejects(call("run_anything", {}), /unknown tool/);
});
