// `taskpods mcp --http`: the MCP server over streamable HTTP, driven by the official MCP TypeScript SDK's
// StreamableHTTPClientTransport against a real engine (authorization on, the server as the Brain). The
// endpoint is loopback only and every caller needs the bearer token; the attacks a local process or a web
// page could try are refused.

import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { after, before, test } from "node:test";

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

import { taskIdFromIdempotencyKey } from "../src/index.js";
import { Installation, TASKPODS_BIN, track } from "./harness.js";
import { toolCaller } from "./tools.js";

const TOKEN = "test-token-0123456789abcdef0123456789abcdef";

let inst: Installation;
let server: ChildProcess;
let url: URL;
let mcp: Client;

/** `taskpods mcp --http ADDR` as the Brain; resolves with the endpoint it prints, or rejects with its stderr when it exits. */
function startServer(addr: string, token: string | undefined): { child: ChildProcess; ready: Promise<URL> } {
  const env: NodeJS.ProcessEnv = { ...process.env, TASKPODS_NATS_URL: inst.url, TASKPODS_CREDS: inst.creds("brain") };
  if (token === undefined) delete env.TASKPODS_MCP_TOKEN;
  else env.TASKPODS_MCP_TOKEN = token;
  const child = track(spawn(TASKPODS_BIN, ["mcp", "--http", addr, "--requester", "http-assistant"], {
    env,
    stdio: ["ignore", "ignore", "pipe"],
  }));
  const ready = new Promise<URL>((resolve, reject) => {
    let stderr = "";
    child.stderr?.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
      const found = /serving MCP on (http:\/\/\S+) \(/.exec(stderr); // a whole line, not a chunk of one
      if (found) resolve(new URL(found[1]));
    });
    child.once("exit", (code) => reject(new Error(`exited with ${code}: ${stderr}`)));
  });
  return { child, ready };
}

function transport(headers: Record<string, string>): StreamableHTTPClientTransport {
  return new StreamableHTTPClientTransport(url, { requestInit: { headers } });
}

const { call, ok } = toolCaller(() => mcp);

before(async () => {
  inst = await Installation.start();
  const started = startServer("127.0.0.1:0", TOKEN);
  server = started.child;
  url = await started.ready;
  assert.equal(url.hostname, "127.0.0.1");
  mcp = new Client({ name: "taskpods-http-test", version: "0.0.0" });
  await mcp.connect(transport({ Authorization: `Bearer ${TOKEN}` }));
});

after(async () => {
  await mcp?.close();
  server?.kill("SIGTERM");
  await inst?.stop();
});

test("over HTTP the tools launch, wait and read a task as over stdio", async () => {
  assert.equal(mcp.getServerVersion()?.name, "taskpods");
  const { tools } = await mcp.listTools();
  assert.deepEqual(tools.map((t) => t.name).sort(), ["cancel_task", "get_task", "launch_task", "list_tasks", "task_output"]);
  const done = await ok("launch_task", { script: "echo over http", timeout_secs: 60, wait: true });
  assert.equal(done.state, "succeeded");
  assert.equal(done.requester, "http-assistant");
  assert.match(String(done.output_tail), /over http/);
  const page = await ok("task_output", { task_id: done.task_id });
  assert.equal(page.text, "over http\n");
});

test("a call waiting for its task does not hold up the others: cancel reaches the task it waits for", async () => {
  const key = "http-concurrent-1";
  const task = taskIdFromIdempotencyKey(key);
  const waiting = ok("launch_task", { script: "echo up; sleep 60", timeout_secs: 120, idempotency_key: key, wait: true, wait_secs: 90 });
  for (let i = 0; ; i++) {
    const now = await call("get_task", { task_id: task });
    if (!now.isError && now.structuredContent?.state === "running") break;
    assert.ok(i < 200, "the task runs within 20 s");
    await new Promise((r) => setTimeout(r, 100));
  }
  const cancelled = await ok("cancel_task", { task_id: task });
  assert.equal(cancelled.state, "cancelling");
  const ended = await waiting;
  assert.equal(ended.task_id, task);
  assert.equal(ended.state, "cancelled");
});

test("without the token, or with a wrong one, the SDK's connect is refused (401)", async () => {
  const attempts: Record<string, string>[] = [{}, { Authorization: "Bearer wrong-token-wrong-token-wrong" }, { Authorization: TOKEN }];
  for (const headers of attempts) {
    const client = new Client({ name: "intruder", version: "0.0.0" });
    await assert.rejects(client.connect(transport(headers)), /401|Unauthorized|bearer token/i);
    await client.close().catch(() => {});
  }
});

test("a web page's request is refused even with the token; there is no event stream to open", async () => {
  const body = JSON.stringify({ jsonrpc: "2.0", id: 1, method: "tools/list" });
  const headers = { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json", Accept: "application/json, text/event-stream" };
  const fromPage = await fetch(url, { method: "POST", body, headers: { ...headers, Origin: "https://evil.example" } });
  assert.equal(fromPage.status, 403);
  const rebound = await fetch(url, { method: "POST", body, headers: { ...headers, Origin: "http://127.0.0.1.evil.example" } });
  assert.equal(rebound.status, 403);
  const local = await fetch(url, { method: "POST", body, headers: { ...headers, Origin: "http://localhost:3000" } });
  assert.equal(local.status, 200);
  assert.equal(((await local.json()) as { result: { tools: unknown[] } }).result.tools.length, 5);
  const stream = await fetch(url, { headers });
  assert.equal(stream.status, 405);
  const garbage = await fetch(url, { method: "POST", body: "{not json", headers });
  assert.equal(garbage.status, 400);
  assert.equal(((await garbage.json()) as { error: { code: number } }).error.code, -32700);
});

test("it refuses to start off loopback or without a token, and says why", async () => {
  await assert.rejects(startServer("0.0.0.0:0", TOKEN).ready, /not a loopback address.*TLS-terminating proxy/);
  await assert.rejects(startServer("127.0.0.1:0", undefined).ready, /needs a bearer token .*TASKPODS_MCP_TOKEN/);
  await assert.rejects(startServer("127.0.0.1:0", "short").ready, /needs a bearer token of at least 16/);
});
