// The README's TypeScript snippet is examples/brain.ts; this runs that exact file against a real engine.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";

import { Installation, REPO } from "./harness.js";

let inst: Installation;

before(async () => {
  inst = await Installation.start();
});

after(async () => {
  await inst?.stop();
});

test("the README's TypeScript snippet is examples/brain.ts, and it runs as printed", async () => {
  const example = readFileSync(join(REPO, "clients/typescript/examples/brain.ts"), "utf8");
  const readme = readFileSync(join(REPO, "README.md"), "utf8");
  assert.ok(readme.includes(example.trim()), "README.md shows clients/typescript/examples/brain.ts verbatim");

  const { stdout } = await promisify(execFile)(process.execPath, [join(REPO, "clients/typescript/dist/examples/brain.js")], {
    env: { ...process.env, TASKPODS_NATS_URL: inst.url },
    timeout: 60_000,
  });
  assert.equal(stdout, 'counting lines\n3\nsucceeded 0 {"lines":3}\n');
});
