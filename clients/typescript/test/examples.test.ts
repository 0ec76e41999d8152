// The README's TypeScript snippet is examples/brain.ts; this runs that exact file against a real engine
// with authorization on, as a new user after `scripts/run` would (the Brain's credentials where it writes them).

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

const EXAMPLE = join(REPO, "clients/typescript/dist/examples/brain.js");

/** The environment of a new user's shell: no TASKPODS_CREDS set, `home` as HOME, the test's NATS. */
function userEnv(home: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, HOME: home, TASKPODS_NATS_URL: inst.url };
  delete env.TASKPODS_CREDS;
  return env;
}

test("the README's TypeScript snippet is examples/brain.ts, and it runs as printed", async () => {
  const example = readFileSync(join(REPO, "clients/typescript/examples/brain.ts"), "utf8");
  const readme = readFileSync(join(REPO, "README.md"), "utf8");
  assert.ok(readme.includes(example.trim()), "README.md shows clients/typescript/examples/brain.ts verbatim");

  const { stdout } = await promisify(execFile)(process.execPath, [EXAMPLE], { env: userEnv(inst.home()), timeout: 60_000 });
  assert.equal(stdout, 'counting lines\n3\nsucceeded 0 {"lines":3}\n');
});

test("without the Brain's credentials the snippet fails and says which file it needs", async () => {
  const failed = await promisify(execFile)(process.execPath, [EXAMPLE], {
    env: userEnv(join(inst.dir, "nobody")),
    timeout: 60_000,
  }).then(
    () => assert.fail("the example ran without credentials"),
    (e: { code: number; stderr: string }) => e,
  );
  assert.notEqual(failed.code, 0);
  assert.match(failed.stderr, /cannot read the NATS credentials .*nobody\/\.local\/share\/taskpods\/auth\/brain\.creds/);
});
