// Subject, stream and bucket names of a taskpods installation, as docs/PROTOCOL.md lists them. One place,
// so a non-default prefix (`acme.prod` → `acme.prod.cmd.launch`, `ACME_PROD_EVT`, `acme_prod_tasks`) is
// applied everywhere alike.

/** The names under one subject prefix (`taskpods` by default). */
export class Names {
  readonly prefix: string;

  constructor(prefix = "taskpods") {
    const ok = prefix.length > 0 && prefix.length <= 64 &&
      prefix.split(".").every((t) => /^[A-Za-z0-9_-]+$/.test(t));
    if (!ok) {
      throw new Error(
        `invalid subject prefix ${JSON.stringify(prefix)}: use letters, digits, '-', '_' and '.'-separated tokens`,
      );
    }
    this.prefix = prefix;
  }

  launch(): string {
    return `${this.prefix}.cmd.launch`;
  }
  cancel(task: string): string {
    return `${this.prefix}.cmd.cancel.${task}`;
  }
  events(task: string): string {
    return `${this.prefix}.evt.${task}`;
  }
  eventsAll(): string {
    return `${this.prefix}.evt.*`;
  }
  log(task: string): string {
    return `${this.prefix}.log.${task}`;
  }
  /** The task id in an event subject, or undefined for a subject that is not one. */
  taskOfEventSubject(subject: string): string | undefined {
    const head = `${this.prefix}.evt.`;
    return subject.startsWith(head) ? subject.slice(head.length) : undefined;
  }

  private stream(suffix: string): string {
    return `${this.prefix.replaceAll(".", "_").toUpperCase()}_${suffix}`;
  }
  private bucket(suffix: string): string {
    return `${this.prefix.replaceAll(".", "_")}_${suffix}`;
  }
  eventStream(): string {
    return this.stream("EVT");
  }
  logStream(): string {
    return this.stream("LOG");
  }
  /** A view bucket of `generation` (1 has the plain name, later rebuilds add `_g<n>`). */
  viewBucket(view: "tasks" | "history" | "active" | "finished", generation: number): string {
    const base = this.bucket(view);
    return generation <= 1 ? base : `${base}_g${generation}`;
  }
  /** The object store bucket of task inputs and artifacts (`<task>/in/<name>`, `<task>/out/<path>`). */
  filesBucket(): string {
    return this.bucket("files");
  }
  /** The bucket holding the pointer to the view generation readers follow. */
  projectionsBucket(): string {
    return this.bucket("projections");
  }
}
