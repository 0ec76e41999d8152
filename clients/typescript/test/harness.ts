// Real servers for the tests: a nats-server with JetStream on a free loopback port and the `taskpods`
// engine (the built binary, local backend: tasks run under bubblewrap on this machine). Nothing is mocked.
// Authorization is on, as `scripts/run` deploys it: `taskpods auth init` writes the identities, the server
// trusts them, the engine runs as `engine` (minting one identity per task) and clients connect as `brain`.
//
// Binaries: NATS_SERVER_BIN (default `nats-server` on PATH), TASKPODS_BIN and TASKPODS_AGENT_BIN (default
// the debug builds in the workspace's target dir; scripts/test builds them).

import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { connect, credsAuthenticator, type NatsConnection } from "nats";

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

/** Kills `child` when the test process goes, however it goes. */
export function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

/** The identities `taskpods auth init` writes credentials for. */
export type Role = "admin" | "engine" | "brain" | "operator";

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

  /** Where `taskpods auth init` wrote this installation's identities. */
  get authDir(): string {
    return join(this.dir, "auth");
  }

  /** The credentials file of `role`. */
  creds(role: Role): string {
    return join(this.authDir, `${role}.creds`);
  }

  static async start(): Promise<Installation> {
    const dir = mkdtempSync(join(tmpdir(), "taskpods-ts-"));
    const port = await freePort();
    const inst = new Installation(dir, `nats://127.0.0.1:${port}`);
    execFileSync(TASKPODS_BIN, ["auth", "init", inst.authDir], { stdio: "ignore" });
    const config = join(dir, "nats.conf");
    writeFileSync(
      config,
      `listen: 127.0.0.1:${port}\njetstream { store_dir: "${join(dir, "nats")}" }\ninclude "auth/nats-auth.conf"\n`,
    );
    inst.nats = track(spawn(NATS_SERVER_BIN, ["-c", config], { stdio: "ignore" }));
    // The server is up when a connection succeeds.
    for (let i = 0;; i++) {
      try {
        const nc = await connect({ servers: inst.url, reconnect: false, authenticator: inst.authenticator("admin") });
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
    const args = ["serve", "--nats-url", this.url, "--backend", "local", "--no-ui", "--creds", this.creds("engine")];
    args.push("--task-signer", join(this.authDir, "task-signer.nk"), "--seal-key", join(this.authDir, "seal.key"));
    this.engine = track(spawn(TASKPODS_BIN, args, {
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

  /**
   * A home directory where the Brain's credentials are where `scripts/run` writes them
   * (`~/.local/share/taskpods/auth/brain.creds`), for running the README's snippets as printed.
   */
  home(): string {
    const home = join(this.dir, "home");
    const auth = join(home, ".local/share/taskpods/auth");
    mkdirSync(auth, { recursive: true });
    copyFileSync(this.creds("brain"), join(auth, "brain.creds"));
    return home;
  }

  private authenticator(role: Role) {
    return credsAuthenticator(readFileSync(this.creds(role)));
  }

  /** A NATS connection as `role` (default `admin`, for checks a Brain may not make), closed by `stop()`. */
  async connect(role: Role = "admin"): Promise<NatsConnection> {
    const nc = await connect({ servers: this.url, authenticator: this.authenticator(role) });
    this.connections.push(nc);
    return nc;
  }

  /** A client connected as a Brain is (`TaskpodsClient.connect` with `brain.creds`), closed by `stop()`. */
  async client(): Promise<TaskpodsClient> {
    const client = await TaskpodsClient.connect(this.url, { creds: this.creds("brain"), replyTimeoutMs: 10_000 });
    this.connections.push(client.nc);
    return client;
  }

  async stop(): Promise<void> {
    for (const nc of this.connections) await nc.close().catch(() => {});
    await this.stopEngine();
    this.nats?.kill("SIGTERM");
    if (this.nats) await exited(this.nats, 5_000);
    rmSync(this.dir, { recursive: true, force: true });
  }
}
