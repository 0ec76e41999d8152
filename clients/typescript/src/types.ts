// The taskpods wire types, generated from docs/schema/taskpods.json by scripts/generate-types.mjs.
// Do not edit: change the Rust types, regenerate the schemas, then run `npm run generate`.

/**
 * Every message and view of the taskpods wire protocol (docs/PROTOCOL.md); each type is in $defs.
 */
export type TaskpodsMessage =
  | LaunchTask
  | CancelTask
  | CommandReply
  | Event
  | AgentReport
  | HelloReply
  | TaskState
  | TaskView
  | HistoryView
  | ActiveView
  | FinishedView
  | Pointer;
/**
 * What the engine answers a command that asked for a reply. Encoded like the command was (JSON in,
 * JSON out).
 */
export type CommandReply =
  | {
      /**
       * For a launch: whether this command created the task (false: it already existed).
       */
      created: boolean;
      outcome: "applied";
      /**
       * Stream sequence of the task's first event (for a launch) or of the last event appended.
       */
      sequence: number;
      /**
       * Its state after the command.
       */
      state:
        | {
            state: "new";
          }
        | {
            state: "accepted";
          }
        | {
            state: "scheduled";
          }
        | {
            state: "starting";
          }
        | {
            state: "running";
          }
        | {
            state: "cancelling";
          }
        | {
            state: "succeeded";
          }
        | {
            /**
             * Why.
             */
            reason:
              | {
                  code: "non_zero_exit";
                  /**
                   * The exit code (128 + signal for a signal).
                   */
                  exit_code: number;
                }
              | {
                  code: "oom_killed";
                }
              | {
                  code: "image_pull";
                }
              | {
                  code: "unschedulable";
                }
              | {
                  code: "quota_exceeded";
                }
              | {
                  code: "evicted";
                }
              | {
                  code: "agent_lost";
                }
              | {
                  code: "job_lost";
                }
              | {
                  code: "deadline_exceeded";
                }
              | {
                  code: "backend_error";
                }
              | {
                  code: "input_missing";
                }
              | {
                  code: "input_too_large";
                }
              | {
                  code: "input_corrupt";
                }
              | {
                  code: "input_unavailable";
                };
            state: "failed";
          }
        | {
            state: "timed_out";
          }
        | {
            state: "cancelled";
          }
        | {
            state: "rejected";
          };
      /**
       * The task.
       */
      task_id: string;
    }
  | {
      outcome: "rejected";
      /**
       * Every problem.
       */
      problems: Problem[];
      /**
       * Stream sequence of the `Rejected` event.
       */
      sequence: number;
      /**
       * The task.
       */
      task_id: string;
    }
  | {
      outcome: "refused";
      /**
       * Why, in words.
       */
      reason: string;
      /**
       * Its state.
       */
      state:
        | {
            state: "new";
          }
        | {
            state: "accepted";
          }
        | {
            state: "scheduled";
          }
        | {
            state: "starting";
          }
        | {
            state: "running";
          }
        | {
            state: "cancelling";
          }
        | {
            state: "succeeded";
          }
        | {
            /**
             * Why.
             */
            reason:
              | {
                  code: "non_zero_exit";
                  /**
                   * The exit code (128 + signal for a signal).
                   */
                  exit_code: number;
                }
              | {
                  code: "oom_killed";
                }
              | {
                  code: "image_pull";
                }
              | {
                  code: "unschedulable";
                }
              | {
                  code: "quota_exceeded";
                }
              | {
                  code: "evicted";
                }
              | {
                  code: "agent_lost";
                }
              | {
                  code: "job_lost";
                }
              | {
                  code: "deadline_exceeded";
                }
              | {
                  code: "backend_error";
                }
              | {
                  code: "input_missing";
                }
              | {
                  code: "input_too_large";
                }
              | {
                  code: "input_corrupt";
                }
              | {
                  code: "input_unavailable";
                };
            state: "failed";
          }
        | {
            state: "timed_out";
          }
        | {
            state: "cancelled";
          }
        | {
            state: "rejected";
          };
      /**
       * The task.
       */
      task_id: string;
    }
  | {
      /**
       * What was wrong.
       */
      error: string;
      outcome: "invalid";
    };
/**
 * One recorded fact about a task.
 */
export type Event = {
  /**
   * When the engine decided it.
   */
  at: string;
  /**
   * Deterministic id (task, position), so an append retried after a crash is byte-identical.
   */
  id: string;
  /**
   * The task the event belongs to.
   */
  task: string;
  /**
   * Envelope version; readers accept any and rely on field names, not positions.
   */
  v: number;
} & Event1;
export type Event1 =
  | {
      /**
       * When the engine will time the task out.
       */
      deadline: string;
      kind: "accepted";
      spec: TaskSpec;
    }
  | {
      kind: "rejected";
      /**
       * What was wrong.
       */
      problems: Problem[];
    }
  | {
      /**
       * The Job name (or local sandbox name).
       */
      job: string;
      kind: "scheduled";
    }
  | {
      kind: "started";
      /**
       * The node it runs on, when known.
       */
      node?: string | null;
      /**
       * The pod name.
       */
      pod: string;
    }
  | {
      kind: "running";
    }
  | {
      kind: "progress";
      /**
       * What it said.
       */
      message: string;
      /**
       * How far along, 0 to 100.
       */
      percent?: number | null;
    }
  | {
      kind: "cancel_requested";
      /**
       * Why.
       */
      reason?: string | null;
      /**
       * Who.
       */
      requester?: string | null;
    }
  | {
      kind: "succeeded";
      outcome: TaskOutcome;
    }
  | {
      kind: "failed";
      /**
       * Details for a person.
       */
      message?: string | null;
      /**
       * What the agent reported, when it got that far.
       */
      outcome?: TaskOutcome1 | null;
      /**
       * The reason code.
       */
      reason:
        | {
            code: "non_zero_exit";
            /**
             * The exit code (128 + signal for a signal).
             */
            exit_code: number;
          }
        | {
            code: "oom_killed";
          }
        | {
            code: "image_pull";
          }
        | {
            code: "unschedulable";
          }
        | {
            code: "quota_exceeded";
          }
        | {
            code: "evicted";
          }
        | {
            code: "agent_lost";
          }
        | {
            code: "job_lost";
          }
        | {
            code: "deadline_exceeded";
          }
        | {
            code: "backend_error";
          }
        | {
            code: "input_missing";
          }
        | {
            code: "input_too_large";
          }
        | {
            code: "input_corrupt";
          }
        | {
            code: "input_unavailable";
          };
    }
  | {
      /**
       * Who noticed: the engine's timer or the Job controller.
       */
      detected_by?: string | null;
      kind: "timed_out";
    }
  | {
      kind: "cancelled";
      /**
       * What the agent reported, if the code exited before the kill.
       */
      outcome?: TaskOutcome1 | null;
    }
  | {
      kind: "reaped";
    };
/**
 * One env value in a [`crate::TaskSpec`].
 */
export type EnvValue = SealedValue | string;
/**
 * A report from the agent inside the task pod.
 */
export type AgentReport =
  | {
      /**
       * The agent's version, for the record.
       */
      agent_version?: string | null;
      report: "hello";
    }
  | {
      /**
       * What the script said.
       */
      message: string;
      /**
       * How far along, 0 to 100, when the script knows.
       */
      percent?: number | null;
      report: "progress";
    }
  | {
      report: "heartbeat";
    }
  | TaskOutcome2;
/**
 * The engine's answer to an agent's hello: everything the agent needs to run its task.
 */
export type HelloReply =
  | Instructions
  | {
      answer: "wait";
      /**
       * How long to wait before asking again.
       */
      retry_after_ms: number;
    }
  | {
      answer: "stop";
      /**
       * Why, for the agent's log.
       */
      reason: string;
    };
/**
 * Where a task is in its lifecycle.
 */
export type TaskState =
  | {
      state: "new";
    }
  | {
      state: "accepted";
    }
  | {
      state: "scheduled";
    }
  | {
      state: "starting";
    }
  | {
      state: "running";
    }
  | {
      state: "cancelling";
    }
  | {
      state: "succeeded";
    }
  | {
      /**
       * Why.
       */
      reason:
        | {
            code: "non_zero_exit";
            /**
             * The exit code (128 + signal for a signal).
             */
            exit_code: number;
          }
        | {
            code: "oom_killed";
          }
        | {
            code: "image_pull";
          }
        | {
            code: "unschedulable";
          }
        | {
            code: "quota_exceeded";
          }
        | {
            code: "evicted";
          }
        | {
            code: "agent_lost";
          }
        | {
            code: "job_lost";
          }
        | {
            code: "deadline_exceeded";
          }
        | {
            code: "backend_error";
          }
        | {
            code: "input_missing";
          }
        | {
            code: "input_too_large";
          }
        | {
            code: "input_corrupt";
          }
        | {
            code: "input_unavailable";
          };
      state: "failed";
    }
  | {
      state: "timed_out";
    }
  | {
      state: "cancelled";
    }
  | {
      state: "rejected";
    };
/**
 * `taskpods_tasks`: the current view of one task.
 */
export type TaskView = {
  /**
   * When it was accepted (or rejected).
   */
  accepted_at?: string | null;
  /**
   * The cancel request, if any.
   */
  cancel?: CancelView | null;
  /**
   * When the engine times it out.
   */
  deadline?: string | null;
  /**
   * Wall-clock time of the user's code, when reported.
   */
  duration_ms?: number | null;
  /**
   * How many events were folded (the next event's position).
   */
  events: number;
  /**
   * The user's code's exit code, when known.
   */
  exit_code?: number | null;
  /**
   * When it ended.
   */
  finished_at?: string | null;
  /**
   * Stream sequence of the first event.
   */
  first_seq: number;
  /**
   * The image the pod runs.
   */
  image?: string | null;
  /**
   * The Job (or local sandbox) name.
   */
  job?: string | null;
  /**
   * Labels for finding it.
   */
  labels?: {
    [k: string]: string;
  };
  /**
   * Details of the failure (or the rejection's problems, joined).
   */
  message?: string | null;
  /**
   * Script or agent mode.
   */
  mode?: Mode | null;
  /**
   * The node the pod ran on.
   */
  node?: string | null;
  /**
   * Bytes of stdout plus stderr, when reported.
   */
  output_bytes?: number | null;
  /**
   * The last 2 KiB of output, as the agent reported it.
   */
  output_tail?: string | null;
  /**
   * Whether output beyond the cap was dropped.
   */
  output_truncated?: boolean;
  /**
   * The pod name.
   */
  pod?: string | null;
  /**
   * Every problem of a rejected launch.
   */
  problems?: Problem[];
  /**
   * The last progress report.
   */
  progress?: ProgressView | null;
  /**
   * How many progress reports there were.
   */
  progress_count?: number;
  /**
   * Whether the Job and pod are known to be gone.
   */
  reaped?: boolean;
  /**
   * Who launched it.
   */
  requester?: string | null;
  /**
   * The result document the script left, if any.
   */
  result?: {
    [k: string]: unknown;
  };
  /**
   * When the agent said hello.
   */
  running_at?: string | null;
  /**
   * When its Job was created.
   */
  scheduled_at?: string | null;
  /**
   * Stream sequence of the last event folded in.
   */
  seq: number;
  /**
   * When its pod was bound.
   */
  started_at?: string | null;
  /**
   * The task.
   */
  task: string;
  /**
   * Seconds allowed.
   */
  timeout_secs?: number | null;
  /**
   * The toolbox the image came from.
   */
  toolbox?: string | null;
  /**
   * How many events of kinds this version does not know were skipped.
   */
  unknown_events?: number;
  /**
   * When the last event was decided.
   */
  updated_at: string;
} & TaskView1;
/**
 * How the task pod runs the work.
 */
export type Mode = "script" | "agent";
export type TaskView1 =
  | {
      state: "new";
    }
  | {
      state: "accepted";
    }
  | {
      state: "scheduled";
    }
  | {
      state: "starting";
    }
  | {
      state: "running";
    }
  | {
      state: "cancelling";
    }
  | {
      state: "succeeded";
    }
  | {
      /**
       * Why.
       */
      reason:
        | {
            code: "non_zero_exit";
            /**
             * The exit code (128 + signal for a signal).
             */
            exit_code: number;
          }
        | {
            code: "oom_killed";
          }
        | {
            code: "image_pull";
          }
        | {
            code: "unschedulable";
          }
        | {
            code: "quota_exceeded";
          }
        | {
            code: "evicted";
          }
        | {
            code: "agent_lost";
          }
        | {
            code: "job_lost";
          }
        | {
            code: "deadline_exceeded";
          }
        | {
            code: "backend_error";
          }
        | {
            code: "input_missing";
          }
        | {
            code: "input_too_large";
          }
        | {
            code: "input_corrupt";
          }
        | {
            code: "input_unavailable";
          };
      state: "failed";
    }
  | {
      state: "timed_out";
    }
  | {
      state: "cancelled";
    }
  | {
      state: "rejected";
    };
/**
 * `taskpods_active`: a live task's summary; deleted when the task ends.
 */
export type ActiveView = {
  /**
   * When it was accepted.
   */
  accepted_at?: string | null;
  /**
   * The cancel request, while cancelling.
   */
  cancel?: CancelView | null;
  /**
   * When the engine times it out.
   */
  deadline?: string | null;
  /**
   * The image.
   */
  image?: string | null;
  /**
   * The Job.
   */
  job?: string | null;
  /**
   * Labels for finding it.
   */
  labels?: {
    [k: string]: string;
  };
  /**
   * The pod.
   */
  pod?: string | null;
  /**
   * The last progress report.
   */
  progress?: ProgressView | null;
  /**
   * Who launched it.
   */
  requester?: string | null;
  /**
   * Stream sequence of the last event folded in.
   */
  seq: number;
  /**
   * When the task entered its current state (a list shows "time in state" from it).
   */
  state_since?: string | null;
  /**
   * The task.
   */
  task: string;
  /**
   * The toolbox the image came from.
   */
  toolbox?: string | null;
  /**
   * When the last event was decided.
   */
  updated_at: string;
} & ActiveView1;
export type ActiveView1 =
  | {
      state: "new";
    }
  | {
      state: "accepted";
    }
  | {
      state: "scheduled";
    }
  | {
      state: "starting";
    }
  | {
      state: "running";
    }
  | {
      state: "cancelling";
    }
  | {
      state: "succeeded";
    }
  | {
      /**
       * Why.
       */
      reason:
        | {
            code: "non_zero_exit";
            /**
             * The exit code (128 + signal for a signal).
             */
            exit_code: number;
          }
        | {
            code: "oom_killed";
          }
        | {
            code: "image_pull";
          }
        | {
            code: "unschedulable";
          }
        | {
            code: "quota_exceeded";
          }
        | {
            code: "evicted";
          }
        | {
            code: "agent_lost";
          }
        | {
            code: "job_lost";
          }
        | {
            code: "deadline_exceeded";
          }
        | {
            code: "backend_error";
          }
        | {
            code: "input_missing";
          }
        | {
            code: "input_too_large";
          }
        | {
            code: "input_corrupt";
          }
        | {
            code: "input_unavailable";
          };
      state: "failed";
    }
  | {
      state: "timed_out";
    }
  | {
      state: "cancelled";
    }
  | {
      state: "rejected";
    };
/**
 * `taskpods_finished`: one finished task in the newest-first index. Written once, when the task ends,
 * so the bucket's stream holds the entries in the order the tasks ended (see `buckets::finished_page`).
 */
export type FinishedView = {
  /**
   * When it was accepted.
   */
  accepted_at?: string | null;
  /**
   * Wall-clock time of the user's code, when reported.
   */
  duration_ms?: number | null;
  /**
   * The exit code, when known.
   */
  exit_code?: number | null;
  /**
   * When it ended.
   */
  finished_at?: string | null;
  /**
   * The image.
   */
  image?: string | null;
  /**
   * Labels for finding it (history filters on them).
   */
  labels?: {
    [k: string]: string;
  };
  /**
   * Failure details.
   */
  message?: string | null;
  /**
   * Whether output beyond the cap was dropped.
   */
  output_truncated?: boolean;
  /**
   * Who launched it.
   */
  requester?: string | null;
  /**
   * Stream sequence of the terminal event.
   */
  seq: number;
  /**
   * The task.
   */
  task: string;
  /**
   * The toolbox the image came from.
   */
  toolbox?: string | null;
} & FinishedView1;
export type FinishedView1 =
  | {
      state: "new";
    }
  | {
      state: "accepted";
    }
  | {
      state: "scheduled";
    }
  | {
      state: "starting";
    }
  | {
      state: "running";
    }
  | {
      state: "cancelling";
    }
  | {
      state: "succeeded";
    }
  | {
      /**
       * Why.
       */
      reason:
        | {
            code: "non_zero_exit";
            /**
             * The exit code (128 + signal for a signal).
             */
            exit_code: number;
          }
        | {
            code: "oom_killed";
          }
        | {
            code: "image_pull";
          }
        | {
            code: "unschedulable";
          }
        | {
            code: "quota_exceeded";
          }
        | {
            code: "evicted";
          }
        | {
            code: "agent_lost";
          }
        | {
            code: "job_lost";
          }
        | {
            code: "deadline_exceeded";
          }
        | {
            code: "backend_error";
          }
        | {
            code: "input_missing";
          }
        | {
            code: "input_too_large";
          }
        | {
            code: "input_corrupt";
          }
        | {
            code: "input_unavailable";
          };
      state: "failed";
    }
  | {
      state: "timed_out";
    }
  | {
      state: "cancelled";
    }
  | {
      state: "rejected";
    };

/**
 * A request to run one task. Only `script` (or `goal`) is required; everything else has a default.
 * `Debug` shows env names, never values.
 */
export interface LaunchTask {
  /**
   * Environment variables for the user's code.
   */
  env?: {
    [k: string]: string;
  };
  /**
   * The goal handed to the agent entrypoint (mode `agent`).
   */
  goal?: string | null;
  /**
   * The caller's key for this piece of work: the same key always names the same task.
   */
  idempotency_key?: string | null;
  /**
   * A container image to run; mutually exclusive with `toolbox`.
   */
  image?: string | null;
  /**
   * Objects of the files bucket the agent downloads into `/tmp/in/<path>` before the code runs.
   */
  inputs?: InputFile[];
  /**
   * Free-form labels for finding tasks later; Kubernetes label syntax.
   */
  labels?: {
    [k: string]: string;
  };
  /**
   * Script or agent mode.
   */
  mode?: "script" | "agent";
  /**
   * Who asked, for the audit trail.
   */
  requester?: string | null;
  resources?: ResourceRequest;
  /**
   * The shell script to run (mode `script`).
   */
  script?: string | null;
  /**
   * Environment variables for the user's code whose values come from keys of Kubernetes Secrets in
   * the task namespace (Kubernetes backend only; refused by other backends). The engine never reads
   * them.
   */
  secret_env?: {
    [k: string]: SecretKeyRef;
  };
  /**
   * The task id the caller wants; when absent it is derived from `idempotency_key`.
   */
  task_id?: string | null;
  /**
   * Seconds before the task is killed; default and maximum 1800.
   */
  timeout_secs?: number | null;
  /**
   * The name of a configured toolbox image; the policy's default when neither is given.
   */
  toolbox?: string | null;
}
/**
 * An input named in a launch: the object to fetch and where the code finds it (`/tmp/in/<path>`).
 */
export interface InputFile {
  /**
   * The digest the caller expects (`SHA-256=<base64url>`, as the object store writes it); checked
   * against the stored object when given.
   */
  digest?: string | null;
  /**
   * The input's name; the agent asks for it by this name. Also its path when `path` is absent.
   */
  name: string;
  /**
   * The object in the files bucket holding its bytes (e.g. `<task>/in/<name>`).
   */
  object: string;
  /**
   * Where under `/tmp/in` the code finds it; `name` when absent.
   */
  path?: string | null;
  /**
   * The size the caller expects, in bytes; checked against the stored object when given.
   */
  size?: number | null;
}
/**
 * CPU and memory; defaults and caps come from the policy.
 */
export interface ResourceRequest {
  /**
   * CPU the container may use at most.
   */
  cpu_limit?: string | null;
  /**
   * CPU the scheduler reserves.
   */
  cpu_request?: string | null;
  /**
   * Memory above which the container is killed.
   */
  memory_limit?: string | null;
  /**
   * Memory the scheduler reserves.
   */
  memory_request?: string | null;
}
/**
 * An env value taken from one key of a Kubernetes Secret in the task namespace (the Kubernetes backend
 * only). The task pod's container gets it through `valueFrom.secretKeyRef`; the engine never reads the
 * Secret, so the value is in no event, view or log. There is no namespace: only the task namespace's
 * Secrets can be named.
 */
export interface SecretKeyRef {
  /**
   * The key in the Secret (letters, digits, `-`, `_` and `.`, at most 253).
   */
  key: string;
  /**
   * The Secret's name (a DNS subdomain: lowercase letters, digits, `-` and `.`, at most 253).
   */
  name: string;
}
/**
 * A request to stop a task.
 */
export interface CancelTask {
  /**
   * Why, for the record.
   */
  reason?: string | null;
  /**
   * Who asked.
   */
  requester?: string | null;
  /**
   * The task to stop.
   */
  task_id: string;
}
/**
 * One thing wrong with a launch: where, and what to do about it.
 */
export interface Problem {
  /**
   * The field path, e.g. `resources.memory_limit` or `env.PATH`.
   */
  field: string;
  /**
   * What is wrong, in words a person can act on.
   */
  message: string;
}
/**
 * The validated launch.
 */
export interface TaskSpec {
  /**
   * Environment for the user's code: names in clear, values sealed by the engine.
   */
  env?: {
    [k: string]: EnvValue;
  };
  files?: FileLimits;
  /**
   * The caller's idempotency key, kept for the record.
   */
  idempotency_key?: string | null;
  /**
   * The image the task pod runs.
   */
  image: string;
  /**
   * The inputs, with their paths resolved (names, sizes and digests only: never contents).
   */
  inputs?: InputFile[];
  /**
   * The script (mode `script`) or goal (mode `agent`).
   */
  instructions: string;
  /**
   * Labels for finding the task.
   */
  labels?: {
    [k: string]: string;
  };
  /**
   * Script or agent mode.
   */
  mode: "script" | "agent";
  /**
   * Who asked.
   */
  requester?: string | null;
  resources: Resources;
  /**
   * Environment for the user's code from Kubernetes Secrets (references only, never values).
   */
  secret_env?: {
    [k: string]: SecretKeyRef;
  };
  /**
   * Seconds until the task is timed out (at most 1800).
   */
  timeout_secs: number;
  /**
   * The toolbox the image came from, when it came from one.
   */
  toolbox?: string | null;
}
/**
 * Encrypted by the engine.
 */
export interface SealedValue {
  /**
   * The algorithm and key version (`chacha20poly1305`).
   */
  alg: string;
  /**
   * `hmac-sha256:<hex>` of the value, keyed with a key derived from the seal key.
   */
  digest: string;
  /**
   * Nonce and ciphertext, base64.
   */
  sealed: string;
}
/**
 * The limits on inputs and artifacts that applied at launch.
 */
export interface FileLimits {
  /**
   * Largest total size of a task's artifacts, bytes; the rest are counted as truncated.
   */
  max_artifact_bytes?: number;
  /**
   * Most artifacts kept from one task; the rest are counted as truncated.
   */
  max_artifacts?: number;
  /**
   * Largest total size of a task's inputs, bytes.
   */
  max_input_bytes?: number;
  /**
   * Most inputs a launch may name.
   */
  max_inputs?: number;
}
/**
 * CPU and memory.
 */
export interface Resources {
  /**
   * CPU cap, millicores.
   */
  cpu_limit_millis: number;
  /**
   * CPU reserved, millicores.
   */
  cpu_request_millis: number;
  /**
   * Memory cap, bytes.
   */
  memory_limit_bytes: number;
  /**
   * Memory reserved, bytes.
   */
  memory_request_bytes: number;
}
/**
 * What the agent reported.
 */
export interface TaskOutcome {
  /**
   * The files the code left in `/tmp/out` that were stored (`<task>/out/<path>`), in path order.
   */
  artifacts?: Artifact[];
  /**
   * What in `/tmp/out` was not stored for another reason (symlinks, special files, bad paths).
   */
  artifacts_skipped?: SkippedArtifact[];
  /**
   * What the per-task artifact caps left out, when they did.
   */
  artifacts_truncated?: ArtifactsTruncated | null;
  /**
   * Wall-clock time of the user's code.
   */
  duration_ms?: number;
  /**
   * The exit code of the user's code; signals are reported as 128 + signal.
   */
  exit_code?: number;
  /**
   * Set when an input could not be provided: the code did not run.
   */
  input_failure?: InputFailure | null;
  /**
   * Set when `/tmp/out` went past its limit while the code ran, and the agent stopped the code (the
   * local sandbox; in a pod, Kubernetes evicts it when its `/tmp` goes past its size).
   */
  out_dir_exceeded?: OutDirExceeded | null;
  /**
   * The last bytes (at most 2 KiB) the code wrote to stdout and stderr, as they arrived, including
   * output beyond the cap: what a person looks at first when a task failed.
   */
  output_tail?: string | null;
  /**
   * Whether output beyond the per-task cap was dropped.
   */
  output_truncated?: boolean;
  /**
   * The JSON document the script left in `/tmp/result.json`, if any.
   */
  result?: {
    [k: string]: unknown;
  };
  /**
   * Bytes written to stderr.
   */
  stderr_bytes?: number;
  /**
   * Bytes written to stdout.
   */
  stdout_bytes?: number;
}
/**
 * One artifact as stored: its path under `/tmp/out`, size and digest.
 */
export interface Artifact {
  /**
   * `SHA-256=<base64url>`, as the object store records it.
   */
  digest: string;
  /**
   * Relative to `/tmp/out`; the object is `<task>/out/<path>`.
   */
  path: string;
  /**
   * Bytes.
   */
  size: number;
}
/**
 * Something in `/tmp/out` that was not uploaded, and why.
 */
export interface SkippedArtifact {
  /**
   * Its path under `/tmp/out` (lossy UTF-8).
   */
  path: string;
  /**
   * Why: `symlink`, `not a regular file`, `bad path`, `unreadable`, `refused`.
   */
  reason: string;
}
/**
 * What the caps left out: counted, not stored.
 */
export interface ArtifactsTruncated {
  /**
   * Their bytes.
   */
  bytes: number;
  /**
   * Files not uploaded because the count or byte cap was reached.
   */
  files: number;
}
/**
 * The agent's report that an input could not be provided.
 */
export interface InputFailure {
  /**
   * The input's name.
   */
  input: string;
  /**
   * Details for a person.
   */
  message: string;
  /**
   * What went wrong.
   */
  problem: "missing" | "too_large" | "corrupt" | "unavailable" | "unknown";
}
/**
 * What `/tmp/out` held when the agent stopped the code for going past its limit. The local sandbox's
 * `/tmp/out` lives on the host (so it outlives the sandbox) and is not inside the sandbox's size-limited
 * `/tmp`: the agent measures it while the code runs and holds it to the same size as that `/tmp`, as the
 * pod's size-limited `/tmp` holds it in Kubernetes.
 */
export interface OutDirExceeded {
  /**
   * The files and directories counted when the code was stopped.
   */
  entries: number;
  /**
   * The most bytes of disk `/tmp/out` may use (what `du` counts).
   */
  limit_bytes: number;
  /**
   * The most files and directories it may hold.
   */
  limit_entries: number;
  /**
   * The bytes of disk measured when the code was stopped.
   */
  used_bytes: number;
}
/**
 * What the agent reports when the user's code has exited.
 */
export interface TaskOutcome1 {
  /**
   * The files the code left in `/tmp/out` that were stored (`<task>/out/<path>`), in path order.
   */
  artifacts?: Artifact[];
  /**
   * What in `/tmp/out` was not stored for another reason (symlinks, special files, bad paths).
   */
  artifacts_skipped?: SkippedArtifact[];
  /**
   * What the per-task artifact caps left out, when they did.
   */
  artifacts_truncated?: ArtifactsTruncated | null;
  /**
   * Wall-clock time of the user's code.
   */
  duration_ms?: number;
  /**
   * The exit code of the user's code; signals are reported as 128 + signal.
   */
  exit_code?: number;
  /**
   * Set when an input could not be provided: the code did not run.
   */
  input_failure?: InputFailure | null;
  /**
   * Set when `/tmp/out` went past its limit while the code ran, and the agent stopped the code (the
   * local sandbox; in a pod, Kubernetes evicts it when its `/tmp` goes past its size).
   */
  out_dir_exceeded?: OutDirExceeded | null;
  /**
   * The last bytes (at most 2 KiB) the code wrote to stdout and stderr, as they arrived, including
   * output beyond the cap: what a person looks at first when a task failed.
   */
  output_tail?: string | null;
  /**
   * Whether output beyond the per-task cap was dropped.
   */
  output_truncated?: boolean;
  /**
   * The JSON document the script left in `/tmp/result.json`, if any.
   */
  result?: {
    [k: string]: unknown;
  };
  /**
   * Bytes written to stderr.
   */
  stderr_bytes?: number;
  /**
   * Bytes written to stdout.
   */
  stdout_bytes?: number;
}
/**
 * The work finished.
 */
export interface TaskOutcome2 {
  report: "result";
}
/**
 * Run this.
 */
export interface Instructions {
  answer: "run";
}
/**
 * A cancel request, as recorded.
 */
export interface CancelView {
  /**
   * When.
   */
  at: string;
  /**
   * Why.
   */
  reason?: string | null;
  /**
   * Who.
   */
  requester?: string | null;
}
/**
 * The last progress the task's code reported.
 */
export interface ProgressView {
  /**
   * When the engine recorded it.
   */
  at: string;
  /**
   * What it said.
   */
  message: string;
  /**
   * How far along, 0 to 100.
   */
  percent?: number | null;
}
/**
 * `taskpods_history`: the timeline of a task's transitions. Progress reports are not listed one by one
 * (the task view keeps the last and a count), so a chatty task cannot grow its history without bound.
 */
export interface HistoryView {
  /**
   * Entries dropped to stay under [`MAX_HISTORY_ENTRIES`].
   */
  dropped?: number;
  /**
   * The transitions, oldest first.
   */
  entries: HistoryEntry[];
  /**
   * Stream sequence of the last entry.
   */
  seq: number;
  /**
   * The task.
   */
  task: string;
}
/**
 * One line of a task's timeline in `taskpods_history`.
 */
export interface HistoryEntry {
  /**
   * When the engine decided it.
   */
  at: string;
  /**
   * A short human summary (job name, reason, message).
   */
  detail?: string | null;
  /**
   * The kind as written (unknown kinds keep their name).
   */
  kind: string;
  /**
   * Stream sequence.
   */
  seq: number;
  /**
   * The state after it.
   */
  state: string;
}
/**
 * The generation readers follow, stored under [`POINTER_KEY`].
 */
export interface Pointer {
  /**
   * The event stream sequence the generation had folded when it became current.
   */
  covered_seq: number;
  /**
   * The generation in use.
   */
  generation: number;
  /**
   * When it became current.
   */
  switched_at: string;
}
