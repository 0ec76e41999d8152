// Real servers for the tests: a nats-server with JetStream on a free loopback port and the `taskpods`
// engine (the built binary, local backend: tasks run under bubblewrap on this machine). Nothing is mocked.
//
// Binaries: NATS_SERVER_BIN (default `nats-server` on PATH), TASKPODS_BIN and TASKPODS_AGENT_BIN (default
// the debug builds in the workspace's target dir; scripts/test builds them).

import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { connect, type NatsConnection } from "nats";

import { TaskpodsClient } from "../src/index.js";

/** The repository root (this file is compiled to clients/typescript/dist/test/). */
export const REPO = resolve(fileURLToPath(new URL(".", import.meta.url)), "../../../..");
const TARGET = process.env.CARGO_TARGET_DIR ?? join(REPO, "target");
export const TASKPODS_BIN = process.env.TASKPODS_BIN ?? join(TARGET, "debug", "taskpods");
const AGENT_BIN = process.env.TASKPODS_AGENT_BIN ?? join(TARGET, "debug", "taskpods-agent");
const NATS_SERVER_BIN = process.env.NATS_SERVER_BIN ?? "nats-server";

function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => done(port));
    });
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Waits for `child` to exit (after a signal), at most `ms`. */
function exited(child: ChildProcess, ms: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((done) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      done();
    }, ms);
    child.once("exit", () => {
      clearTimeout(timer);
      done();
    });
  });
}

/** Every server a test started, killed when the test process goes, however it goes. */
const children = new Set<ChildProcess>();
function killChildren(): void {
  for (const child of children) child.kill("SIGKILL");
}
process.on("exit", killChildren);
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, () => {
    killChildren();
    process.exit(1);
  });
}

function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

/** A nats-server and an engine, started for one test file and stopped by `stop()`. */
export class Installation {
  readonly dir: string;
  readonly url: string;
  private nats?: ChildProcess;
  private engine?: ChildProcess;
  private readonly connections: NatsConnection[] = [];
  /** The engine's log (stderr), for failure messages. */
  engineLog = "";

  private constructor(dir: string, url: string) {
    this.dir = dir;
    this.url = url;
  }

  static async start(): Promise<Installation> {
    const dir = mkdtempSync(join(tmpdir(), "taskpods-ts-"));
    const port = await freePort();
    const inst = new Installation(dir, `nats://127.0.0.1:${port}`);
    inst.nats = track(spawn(NATS_SERVER_BIN, ["-js", "-sd", join(dir, "nats"), "-a", "127.0.0.1", "-p", String(port)], {
      stdio: "ignore",
    }));
    // The server is up when a connection succeeds.
    for (let i = 0;; i++) {
      try {
        const nc = await connect({ servers: inst.url, reconnect: false });
        await nc.close();
        break;
      } catch (e) {
        if (i > 100) throw new Error(`nats-server (${NATS_SERVER_BIN}) did not start on ${inst.url}: ${e}`);
        await sleep(50);
      }
    }
    await inst.startEngine();
    return inst;
  }

  /** Starts the engine (again, after `stopEngine`) and waits until its views exist. */
  async startEngine(): Promise<void> {
    this.engine = track(spawn(TASKPODS_BIN, ["serve", "--nats-url", this.url, "--backend", "local", "--no-ui"], {
      env: {
        ...process.env,
        TASKPODS_AGENT_BIN: AGENT_BIN,
        TASKPODS_DATA: join(this.dir, "data"),
        RUST_LOG: "warn",
      },
      stdio: ["ignore", "ignore", "pipe"],
    }));
    this.engine.stderr?.on("data", (chunk: Buffer) => {
      this.engineLog += chunk.toString();
    });
    const nc = await this.connect();
    const jsm = await nc.jetstreamManager();
    for (let i = 0;; i++) {
      try {
        await jsm.streams.info("KV_taskpods_tasks");
        await jsm.streams.info("TASKPODS_CMD");
        await jsm.consumers.list("TASKPODS_CMD").next().then((page) => {
          if (page.length === 0) throw new Error("no intake consumer yet");
        });
        return;
      } catch (e) {
        if (this.engine.exitCode !== null) {
          throw new Error(`the engine (${TASKPODS_BIN}) exited: ${this.engineLog}`);
        }
        if (i > 600) throw new Error(`the engine did not set up its streams: ${e}\n${this.engineLog}`);
        await sleep(50);
      }
    }
  }

  /** Stops the engine (SIGTERM, as an operator would). */
  async stopEngine(): Promise<void> {
    if (this.engine === undefined) return;
    this.engine.kill("SIGTERM");
    await exited(this.engine, 10_000);
    this.engine = undefined;
  }

  /** A NATS connection, closed by `stop()`. */
  async connect(): Promise<NatsConnection> {
    const nc = await connect({ servers: this.url });
    this.connections.push(nc);
    return nc;
  }

  /** A client on a fresh connection, closed by `stop()`. */
  async client(): Promise<TaskpodsClient> {
    return new TaskpodsClient(await this.connect(), { replyTimeoutMs: 10_000 });
  }

  async stop(): Promise<void> {
    for (const nc of this.connections) await nc.close().catch(() => {});
    await this.stopEngine();
    this.nats?.kill("SIGTERM");
    if (this.nats) await exited(this.nats, 5_000);
    rmSync(this.dir, { recursive: true, force: true });
  }
}
