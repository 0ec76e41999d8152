// The taskpods client for Brains written in TypeScript: launch, read and follow tasks over NATS, exactly as
// docs/PROTOCOL.md describes (commands as JSON on the command stream, events in msgpack on the event
// stream, views as JSON in KV). The Rust client (`client/`) is the other implementation of that page.

import { readFileSync } from "node:fs";
import { homedir } from "node:os";

import { decode as decodeMsgpack } from "@msgpack/msgpack";
import {
  connect,
  type ConnectionOptions,
  createInbox,
  credsAuthenticator,
  ErrorCode,
  NatsError,
  DeliverPolicy,
  headers as natsHeaders,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
  type KV,
  type NatsConnection,
  type StoredMsg,
} from "nats";

import { idString, newTaskId, taskIdFromIdempotencyKey } from "./ids.js";
import { Names } from "./names.js";
import type {
  ActiveView,
  CancelTask,
  CommandReply,
  Event,
  FinishedView,
  HistoryView,
  LaunchTask,
  Problem,
  TaskSpec,
  TaskState,
  TaskView,
} from "./types.js";

/** What kind of failure a {@link TaskpodsError} is, for callers that branch on it. */
export type ErrorKind =
  | "rejected" // the launch was invalid; the task exists as rejected, `problems` says why
  | "refused" // the engine refused the command (unknown task, already ended, already cancelling)
  | "invalid" // the engine could not read the command
  | "unreachable" // NATS could not be reached or a request failed
  | "credentials" // the NATS credentials file could not be read
  | "unauthorized" // NATS refused the credentials (or their absence), or they do not allow the operation
  | "timed_out" // nobody answered in time
  | "corrupt"; // a stored message could not be decoded

/** Every failure of the client, with its kind and what the engine said. */
export class TaskpodsError extends Error {
  readonly kind: ErrorKind;
  readonly taskId?: string;
  readonly problems?: Problem[];
  readonly state?: TaskState;

  constructor(
    kind: ErrorKind,
    message: string,
    extra: { taskId?: string; problems?: Problem[]; state?: TaskState; cause?: unknown } = {},
  ) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = "TaskpodsError";
    this.kind = kind;
    this.taskId = extra.taskId;
    this.problems = extra.problems;
    this.state = extra.state;
  }
}

/**
 * A failed NATS request as a {@link TaskpodsError}: `unauthorized` when the server's permissions for this
 * identity forbid it (nats.js reports the violation on the request), `unreachable` otherwise.
 */
function requestFailed(message: string, e: unknown, extra: { taskId?: string } = {}): TaskpodsError {
  if (e instanceof NatsError && e.code === ErrorCode.PermissionsViolation) {
    return new TaskpodsError("unauthorized", `${message}: this NATS identity may not: ${e.message}`, { ...extra, cause: e });
  }
  return new TaskpodsError("unreachable", `${message}: ${e}`, { ...extra, cause: e });
}

/** Client settings. */
export interface ClientOptions {
  /** Subject prefix of the installation (default `taskpods`). */
  prefix?: string;
  /** How long to wait for the engine's answer to a command, in ms (default 10 000). */
  replyTimeoutMs?: number;
}

/** How {@link TaskpodsClient.connect} connects. */
export interface ConnectOptions extends ClientOptions {
  /**
   * The NATS credentials of the Brain's identity (`brain.creds` from `taskpods auth init`; `scripts/run`
   * prints where): the path of the `.creds` file (a leading `~/` is the home directory) or its contents.
   * Default: the file the `TASKPODS_CREDS` environment variable names, as for the `taskpods` CLI; none
   * when it is unset. `false`: connect without credentials (a server without authorization).
   */
  creds?: string | Uint8Array | false;
  /** Further nats.js connection options (`authenticator` is set from `creds`). */
  nats?: ConnectionOptions;
}

/** The answer to a launch. */
export interface Launched {
  /** The task. */
  taskId: string;
  /** Its state when the engine answered. */
  state: TaskState;
  /** Stream sequence of its first event: pass it to `get(taskId, { atLeast })` to read your write. */
  sequence: number;
  /** False when the launch found an existing task (same id or idempotency key). */
  created: boolean;
}

/** An event as stored, with its stream sequence. */
export interface StoredEvent {
  sequence: number;
  event: Event;
}

/** One piece of a task's output (docs/PROTOCOL.md, "Output"). */
export interface LogChunk {
  /** `stdout`, `stderr`, `truncated` (the cap was reached; `data` says so in words) or `end`. */
  kind: "stdout" | "stderr" | "truncated" | "end";
  /** Position in the task's output, 0, 1, 2, … */
  seq: number;
  /** The bytes as the code wrote them (binary-safe). */
  data: Uint8Array;
}

/** One page of finished tasks, newest first. */
export interface FinishedPage {
  entries: FinishedView[];
  /** Pass as `before` for the next (older) page; undefined at the end. */
  next?: number;
}

/** Which tasks {@link TaskpodsClient.watchTasks} follows. */
export interface TaskFilter {
  /** Only tasks launched with this `requester`. */
  requester?: string;
  /** Only tasks carrying all of these labels (with these values). */
  labels?: Record<string, string>;
}

/** Where {@link TaskpodsClient.watchTasks} starts reading. */
export type WatchFrom = "new" | "all" | { sequence: number } | { time: Date };

/** An event of one of the watched tasks. */
export interface WatchedEvent extends StoredEvent {
  /** The task it belongs to. */
  taskId: string;
  /** The task's validated launch (from its `accepted` event), when it was accepted. */
  spec?: TaskSpec;
}

const TERMINAL_KINDS = new Set(["rejected", "succeeded", "failed", "timed_out", "cancelled"]);

/** Whether an event ends its task (only `reaped` may follow). */
export function isTerminal(event: Event): boolean {
  return TERMINAL_KINDS.has(event.kind);
}

const te = new TextEncoder();
const td = new TextDecoder();

function isNotFound(e: unknown): boolean {
  const code = (e as { code?: unknown })?.code;
  return code === "404" || code === 404;
}

/** Direct gets (any replica answers). nats.js 2.x has them on the manager at run time but not in its types. */
interface DirectGets {
  getMessage(
    stream: string,
    query: { seq: number } | { last_by_subj: string } | { seq: number; next_by_subj: string },
  ): Promise<StoredMsg>;
}

function direct(jsm: JetStreamManager): DirectGets {
  return (jsm as unknown as { direct: DirectGets }).direct;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Decodes an event as stored (msgpack), accepting the 16-byte ids of events written before ids were strings. */
export function decodeEvent(bytes: Uint8Array): Event {
  const value = decodeMsgpack(bytes) as Record<string, unknown>;
  if (value === null || typeof value !== "object" || typeof value.kind !== "string") {
    throw new Error("not an event: expected a map with a `kind`");
  }
  value.id = idString(value.id);
  value.task = idString(value.task);
  return value as unknown as Event;
}

/** The credentials `connect` uses: a file's contents, and where they came from for messages. */
function loadCreds(creds: string | Uint8Array | false | undefined): { contents: Uint8Array; source: string } | undefined {
  if (creds === undefined || creds === false || creds === "") return undefined;
  if (typeof creds !== "string") return { contents: creds, source: "given" };
  const path = creds.startsWith("~/") ? homedir() + creds.slice(1) : creds;
  try {
    return { contents: readFileSync(path), source: path };
  } catch (e) {
    throw new TaskpodsError("credentials", `cannot read the NATS credentials ${path}: ${(e as Error).message}`, {
      cause: e,
    });
  }
}

/** A connection to a taskpods installation. */
export class TaskpodsClient {
  readonly nc: NatsConnection;
  readonly names: Names;
  private readonly js: JetStreamClient;
  private readonly replyTimeoutMs: number;
  private jsmPromise?: Promise<JetStreamManager>;

  constructor(nc: NatsConnection, options: ClientOptions = {}) {
    this.nc = nc;
    this.names = new Names(options.prefix);
    this.js = nc.jetstream();
    this.replyTimeoutMs = options.replyTimeoutMs ?? 10_000;
  }

  /**
   * Connects to NATS (`servers` like `127.0.0.1:4222`) with the Brain's credentials (see
   * {@link ConnectOptions.creds}) and returns a client. Fails with `credentials` when the file cannot be
   * read, `unauthorized` when the server refuses the identity (or needs one and none was given),
   * `unreachable` otherwise.
   */
  static async connect(servers: string | string[], options: ConnectOptions = {}): Promise<TaskpodsClient> {
    const creds = loadCreds(options.creds === undefined ? process.env.TASKPODS_CREDS : options.creds);
    const nats: ConnectionOptions = { ...options.nats, servers };
    if (creds !== undefined) nats.authenticator = credsAuthenticator(creds.contents);
    try {
      const nc = await connect(nats);
      return new TaskpodsClient(nc, options);
    } catch (e) {
      if (e instanceof NatsError && e.code === ErrorCode.AuthorizationViolation) {
        const why = creds === undefined
          ? "it requires credentials: pass `creds` (brain.creds from `taskpods auth init`) or set TASKPODS_CREDS"
          : `it does not accept the credentials ${creds.source} (from another installation, or revoked?)`;
        throw new TaskpodsError("unauthorized", `NATS at ${servers} refused the connection: ${why}`, { cause: e });
      }
      if (creds !== undefined && e instanceof NatsError && e.code === ErrorCode.BadCreds) {
        throw new TaskpodsError("credentials", `the NATS credentials ${creds.source} are not usable: ${e}`, { cause: e });
      }
      throw new TaskpodsError("unreachable", `cannot reach NATS at ${servers}: ${e}`, { cause: e });
    }
  }

  /** Closes the NATS connection. */
  async close(): Promise<void> {
    await this.nc.close();
  }

  private jsm(): Promise<JetStreamManager> {
    this.jsmPromise ??= this.nc.jetstreamManager();
    return this.jsmPromise;
  }

  /**
   * Publishes a JSON command durably with a reply inbox and waits for the engine's reply. Undefined: the
   * server dropped it as a duplicate of an earlier publish, or no reply came in time.
   */
  private async command(subject: string, msgId: string, body: unknown): Promise<CommandReply | undefined> {
    const inbox = createInbox();
    const sub = this.nc.subscribe(inbox, { max: 1 });
    try {
      const h = natsHeaders();
      h.set("Content-Type", "application/json");
      h.set("Taskpods-Reply-To", inbox);
      let ack;
      try {
        ack = await this.js.publish(subject, te.encode(JSON.stringify(body)), { headers: h, msgID: msgId });
      } catch (e) {
        throw requestFailed(`publishing to ${subject}`, e);
      }
      if (ack.duplicate) return undefined;
      const reply = await Promise.race([
        (async () => {
          for await (const m of sub) return m;
          return undefined;
        })(),
        sleep(this.replyTimeoutMs).then(() => undefined),
      ]);
      if (reply === undefined) return undefined;
      try {
        return JSON.parse(td.decode(reply.data)) as CommandReply;
      } catch (e) {
        throw new TaskpodsError("corrupt", `the engine's reply is not JSON: ${e}`, { cause: e });
      }
    } finally {
      sub.unsubscribe();
    }
  }

  /**
   * Launches a task, or finds the one this launch names already (same `task_id` or `idempotency_key`:
   * retrying is always safe). An invalid launch throws a `rejected` error carrying every problem.
   */
  async launch(launch: LaunchTask): Promise<Launched> {
    const taskId = launch.task_id ??
      (launch.idempotency_key != null ? taskIdFromIdempotencyKey(launch.idempotency_key) : newTaskId());
    const body: LaunchTask = { ...launch, task_id: taskId };
    const reply = await this.command(this.names.launch(), `launch:${taskId}`, body);
    if (reply === undefined) {
      // A repeat inside the duplicate window, or an engine that restarted before replying: the task's own
      // subject has the answer once its first event exists.
      return this.firstEvent(taskId);
    }
    const launched = applied(reply);
    // A repeat of a rejected launch: the problems are in the task's first event.
    if (launched.state.state === "rejected") return this.firstEvent(taskId);
    return launched;
  }

  private async firstEvent(taskId: string): Promise<Launched> {
    const deadline = Date.now() + this.replyTimeoutMs;
    for (;;) {
      const first = await this.eventAt(taskId, 1);
      if (first !== undefined) {
        if (first.event.kind === "rejected") {
          const problems = (first.event as { problems: Problem[] }).problems;
          throw rejected(taskId, problems);
        }
        const view = await this.get(taskId);
        return {
          taskId,
          state: view === undefined ? { state: "accepted" } : stateOf(view),
          sequence: first.sequence,
          created: false,
        };
      }
      if (Date.now() > deadline) {
        throw new TaskpodsError(
          "timed_out",
          `no answer within ${this.replyTimeoutMs} ms from the engine to launch ${taskId} (is an engine running?)`,
          { taskId },
        );
      }
      await sleep(50);
    }
  }

  /** The task's first event at or after stream sequence `from`, read with a direct get. */
  private async eventAt(taskId: string, from: number): Promise<StoredEvent | undefined> {
    const jsm = await this.jsm();
    try {
      const m = await direct(jsm).getMessage(this.names.eventStream(), {
        seq: from,
        next_by_subj: this.names.events(taskId),
      });
      return { sequence: m.seq, event: decodeEvent(m.data) };
    } catch (e) {
      if (isNotFound(e)) return undefined;
      throw requestFailed(`reading the events of ${taskId}`, e, { taskId });
    }
  }

  /** The task's stored events, in order (empty for an unknown task). */
  async history(taskId: string): Promise<StoredEvent[]> {
    const out: StoredEvent[] = [];
    let next = 1;
    for (;;) {
      const stored = await this.eventAt(taskId, next);
      if (stored === undefined) return out;
      out.push(stored);
      next = stored.sequence + 1;
    }
  }

  /** Follows the generation pointer to the bucket of `view` readers use now. */
  private async viewBucket(view: "tasks" | "history" | "active" | "finished"): Promise<KV> {
    let generation = 1;
    try {
      const meta = await this.js.views.kv(this.names.projectionsBucket(), { bindOnly: true });
      const pointer = await meta.get("current");
      if (pointer !== null && pointer.operation === "PUT") {
        generation = (JSON.parse(td.decode(pointer.value)) as { generation: number }).generation;
      }
    } catch (e) {
      if (!isNotFound(e) && !String(e).includes("stream not found")) {
        throw requestFailed("reading the view pointer", e);
      }
    }
    try {
      return await this.js.views.kv(this.names.viewBucket(view, generation), { bindOnly: true });
    } catch (e) {
      throw new TaskpodsError("unreachable", `opening the ${view} view: ${e} (is an engine running?)`, {
        cause: e,
      });
    }
  }

  /**
   * The task's view as UIs read it (`taskpods_tasks`), or undefined for a task the views do not have. With
   * `atLeast` (e.g. {@link Launched.sequence}), waits until the view has folded that event: read your
   * writes. Throws `timed_out` when it has not within `timeoutMs` (default: the reply timeout).
   */
  async get(taskId: string, options: { atLeast?: number; timeoutMs?: number } = {}): Promise<TaskView | undefined> {
    const kv = await this.viewBucket("tasks");
    const atLeast = options.atLeast ?? 0;
    const read = async (): Promise<TaskView | undefined> => {
      const e = await kv.get(taskId);
      return e === null || e.operation !== "PUT" ? undefined : (JSON.parse(td.decode(e.value)) as TaskView);
    };
    const deadline = Date.now() + (options.timeoutMs ?? this.replyTimeoutMs);
    for (;;) {
      const view = await read();
      if (atLeast === 0 || (view !== undefined && view.seq >= atLeast)) return view;
      if (Date.now() > deadline) {
        throw new TaskpodsError(
          "timed_out",
          `the view of ${taskId} did not reach sequence ${atLeast} (is the engine's projector running?)`,
          { taskId },
        );
      }
      await sleep(25);
    }
  }

  /** The task's timeline (`taskpods_history`), or undefined for a task the views do not have. */
  async timeline(taskId: string): Promise<HistoryView | undefined> {
    const kv = await this.viewBucket("history");
    const e = await kv.get(taskId);
    return e === null || e.operation !== "PUT" ? undefined : (JSON.parse(td.decode(e.value)) as HistoryView);
  }

  /**
   * The task's events from the first, then live as they are appended. Never ends by itself unless
   * `untilEnd` is set (then it stops after the event that ends the task); `break` out of the loop to stop.
   */
  async *events(taskId: string, options: { untilEnd?: boolean } = {}): AsyncGenerator<StoredEvent> {
    // An ordered consumer starts at sequence 1 unless told otherwise: every event. (nats.js 2.x sends
    // an explicit `deliver_policy: all` together with a start sequence, which the server refuses.)
    const consumer = await this.js.consumers.get(this.names.eventStream(), {
      filterSubjects: this.names.events(taskId),
    });
    const messages = await consumer.consume();
    try {
      for await (const m of messages) {
        const stored = { sequence: m.seq, event: decodeStored(m) };
        yield stored;
        if (options.untilEnd && isTerminal(stored.event)) return;
      }
    } finally {
      messages.stop();
    }
  }

  /**
   * Follows the task until it ends and returns its view once the views include the end (so `state`,
   * `exit_code`, `output_tail` and `result` are there). Throws `timed_out` after `timeoutMs` (default 30 min).
   */
  async wait(taskId: string, options: { timeoutMs?: number } = {}): Promise<TaskView> {
    const timeoutMs = options.timeoutMs ?? 30 * 60_000;
    const events = this.events(taskId, { untilEnd: true });
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), timeoutMs);
    });
    try {
      for (;;) {
        const next = await Promise.race([events.next(), expired]);
        if (next === undefined) {
          throw new TaskpodsError("timed_out", `task ${taskId} did not end within ${timeoutMs} ms`, { taskId });
        }
        if (next.done) break;
        if (isTerminal(next.value.event)) {
          const view = await this.get(taskId, { atLeast: next.value.sequence });
          if (view === undefined) throw new TaskpodsError("corrupt", `task ${taskId} ended but has no view`);
          return view;
        }
      }
      throw new TaskpodsError("unreachable", `the event subscription of ${taskId} ended`, { taskId });
    } finally {
      clearTimeout(timer);
      await events.return(undefined);
    }
  }

  /**
   * The task's output from the start. With `follow` (default) it goes on live until the agent's `end`
   * marker, or, for an agent killed before it could write one, until the task has ended and no output
   * came for `quietMs`. Without `follow` it yields what is stored and stops.
   */
  async *logs(taskId: string, options: { follow?: boolean; quietMs?: number } = {}): AsyncGenerator<LogChunk> {
    const follow = options.follow ?? true;
    const quietMs = options.quietMs ?? 2_000;
    const consumer = await this.js.consumers.get(this.names.logStream(), {
      filterSubjects: this.names.log(taskId),
    });
    for (;;) {
      const batch = await consumer.fetch({ max_messages: 256, expires: follow ? quietMs : 1_000 });
      let got = 0;
      let pending = 1;
      for await (const m of batch) {
        got++;
        pending = m.info.pending;
        const kind = (m.headers?.get("Taskpods-Log-Kind") ?? "") as LogChunk["kind"];
        const seq = Number(m.headers?.get("Taskpods-Log-Seq") ?? "0");
        if (kind === "stdout" || kind === "stderr" || kind === "truncated" || kind === "end") {
          yield { kind, seq, data: m.data };
        }
        if (kind === "end") return;
      }
      if (!follow && (got === 0 || pending === 0)) return;
      if (follow && got === 0) {
        const last = await this.lastEvent(taskId);
        // The task's last event ends it (or is `reaped`, which only follows the end).
        if (last !== undefined && (isTerminal(last) || last.kind === "reaped")) return;
      }
    }
  }

  private async lastEvent(taskId: string): Promise<Event | undefined> {
    const jsm = await this.jsm();
    try {
      const m = await direct(jsm).getMessage(this.names.eventStream(), { last_by_subj: this.names.events(taskId) });
      return decodeEvent(m.data);
    } catch (e) {
      if (isNotFound(e)) return undefined;
      throw requestFailed(`reading the events of ${taskId}`, e, { taskId });
    }
  }

  /**
   * Asks for the task to stop; returns its state after the request (`cancelling`, or `cancelled` for a
   * task that had no Job yet). Unknown, finished or already cancelling tasks throw a `refused` error.
   */
  async cancel(taskId: string, options: { reason?: string; requester?: string } = {}): Promise<TaskState> {
    const body: CancelTask = { task_id: taskId, reason: options.reason, requester: options.requester };
    // Unique per request: a second cancel must reach the engine to be refused, not be dropped as a duplicate.
    const reply = await this.command(this.names.cancel(taskId), `cancel:${taskId}:${newTaskId()}`, body);
    if (reply === undefined) {
      throw new TaskpodsError("timed_out", `no answer from the engine to the cancel of ${taskId} (is an engine running?)`, {
        taskId,
      });
    }
    return applied(reply).state;
  }

  /** Every live task (from `taskpods_active`), oldest first. */
  async listActive(): Promise<ActiveView[]> {
    const kv = await this.viewBucket("active");
    const out: ActiveView[] = [];
    for await (const key of await kv.keys()) {
      const e = await kv.get(key);
      if (e !== null && e.operation === "PUT") out.push(JSON.parse(td.decode(e.value)) as ActiveView);
    }
    out.sort((a, b) => (a.accepted_at ?? "").localeCompare(b.accepted_at ?? "") || a.seq - b.seq);
    return out;
  }

  /**
   * Finished tasks, newest first, `limit` (default 20) at a time: pass the page's `next` as `before` for
   * the next page. Costs one stream info and `limit` direct gets, however many tasks ever ran.
   */
  async listFinished(options: { before?: number; limit?: number } = {}): Promise<FinishedPage> {
    const limit = Math.max(1, options.limit ?? 20);
    const kv = await this.viewBucket("finished");
    const stream = `KV_${(await kv.status()).bucket}`;
    const jsm = await this.jsm();
    const info = await jsm.streams.info(stream);
    const first = Math.max(1, info.state.first_seq);
    let cursor = options.before ?? info.state.last_seq + 1;
    const entries: FinishedView[] = [];
    // Entries are written once per task, so sequences are dense and one round normally fills the page;
    // the loop only goes on over gaps (deleted or purged entries).
    while (entries.length < limit && cursor > first) {
      const low = Math.max(first, cursor - (limit - entries.length));
      const seqs = [];
      for (let s = cursor - 1; s >= low; s--) seqs.push(s);
      const got = await Promise.all(seqs.map(async (seq) => {
        try {
          return await direct(jsm).getMessage(stream, { seq });
        } catch (e) {
          if (isNotFound(e)) return undefined;
          throw requestFailed(`reading finished entry ${seq}`, e);
        }
      }));
      for (const m of got) {
        if (m === undefined || m.data.length === 0) continue;
        const op = m.header?.get("KV-Operation");
        if (op && op !== "PUT") continue;
        entries.push(JSON.parse(td.decode(m.data)) as FinishedView);
      }
      cursor = low;
    }
    return { entries, next: cursor > first ? cursor : undefined };
  }

  /**
   * Follows the transitions of every task that matches `filter` (by requester and labels), live, across
   * all tasks: an ordered consumer on `<prefix>.evt.*`, filtered here. A task is matched by its
   * `accepted` event (read once per task and remembered), so events of tasks accepted before `from` are
   * matched too. `from`: `"new"` (default: only what happens from now on), `"all"`, `{ sequence }` (e.g.
   * the last sequence this Brain processed, to resume) or `{ time }`. `break` out of the loop to stop.
   */
  async *watchTasks(filter: TaskFilter, options: { from?: WatchFrom } = {}): AsyncGenerator<WatchedEvent> {
    const from = options.from ?? "new";
    const start = from === "new"
      ? { deliver_policy: DeliverPolicy.New }
      : from === "all"
      ? {}
      : "sequence" in from
      ? { opt_start_seq: from.sequence }
      : { opt_start_time: from.time.toISOString() };
    const consumer = await this.js.consumers.get(this.names.eventStream(), {
      filterSubjects: this.names.eventsAll(),
      ...start,
    });
    // Task → its spec when it matches, or null when it does not. Bounded: the oldest decisions are
    // forgotten first (a forgotten task is looked up again, at the cost of one direct get).
    const decided = new Map<string, TaskSpec | null>();
    const messages = await consumer.consume();
    try {
      for await (const m of messages) {
        const taskId = this.names.taskOfEventSubject(m.subject);
        if (taskId === undefined) continue;
        const event = decodeStored(m);
        let spec = decided.get(taskId);
        if (spec === undefined) {
          const first = event.kind === "accepted" || event.kind === "rejected"
            ? event
            : (await this.eventAt(taskId, 1))?.event;
          spec = first?.kind === "accepted" ? (first as { spec: TaskSpec }).spec : null;
          const match = spec !== null && matches(spec, filter);
          decided.set(taskId, match ? spec : null);
          if (decided.size > 10_000) decided.delete(decided.keys().next().value as string);
          spec = match ? spec : null;
        }
        if (spec !== null) yield { sequence: m.seq, event, taskId, spec };
      }
    } finally {
      messages.stop();
    }
  }
}

function matches(spec: TaskSpec, filter: TaskFilter): boolean {
  if (filter.requester !== undefined && spec.requester !== filter.requester) return false;
  for (const [key, value] of Object.entries(filter.labels ?? {})) {
    if (spec.labels?.[key] !== value) return false;
  }
  return true;
}

function decodeStored(m: JsMsg): Event {
  try {
    return decodeEvent(m.data);
  } catch (e) {
    throw new TaskpodsError("corrupt", `event at sequence ${m.seq}: ${e}`, { cause: e });
  }
}

function stateOf(view: TaskView): TaskState {
  return ("reason" in view ? { state: view.state, reason: view.reason } : { state: view.state }) as TaskState;
}

function rejected(taskId: string, problems: Problem[]): TaskpodsError {
  const text = problems.map((p) => `${p.field}: ${p.message}`).join("; ");
  return new TaskpodsError("rejected", `task ${taskId} rejected: ${text}`, { taskId, problems });
}

/** An `applied` reply as its result; every other outcome as the error it stands for. */
function applied(reply: CommandReply): Launched {
  switch (reply.outcome) {
    case "applied":
      return { taskId: reply.task_id, state: reply.state, sequence: reply.sequence, created: reply.created };
    case "rejected":
      throw rejected(reply.task_id, reply.problems);
    case "refused":
      throw new TaskpodsError("refused", `task ${reply.task_id}: ${reply.reason}`, {
        taskId: reply.task_id,
        state: reply.state,
      });
    case "invalid":
      throw new TaskpodsError("invalid", `the engine could not read the command: ${reply.error}`);
  }
}
