// A Brain's whole use of taskpods: launch (idempotent), follow the output live, read the outcome.
// README.md shows this file as it is; test/examples.test.ts runs it against a real engine.
import { TaskpodsClient } from "@taskpods/client";

// The Brain's NATS identity: brain.creds from `taskpods auth init` (scripts/run writes it where this says).
const taskpods = await TaskpodsClient.connect(process.env.TASKPODS_NATS_URL ?? "127.0.0.1:4222", {
  creds: process.env.TASKPODS_CREDS ?? "~/.local/share/taskpods/auth/brain.creds",
});

const { taskId } = await taskpods.launch({
  idempotency_key: "brain-42/turn-7/step-3", // a retry returns the same task, never a second one
  script: "echo 'counting lines'; printf 'a\\nb\\nc\\n' | wc -l; echo '{\"lines\": 3}' > /tmp/result.json",
  timeout_secs: 60,
  labels: { team: "ml" },
  requester: "brain-42",
});

for await (const chunk of taskpods.logs(taskId)) {
  if (chunk.kind === "stdout") process.stdout.write(chunk.data);
}

const done = await taskpods.wait(taskId);
console.log(done.state, done.exit_code, JSON.stringify(done.result)); // succeeded 0 {"lines":3}
await taskpods.close();
