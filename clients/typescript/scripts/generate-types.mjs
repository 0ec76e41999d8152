// Generates src/types.ts from docs/schema/taskpods.json (every wire type, generated from the Rust types).
// `npm run generate` writes it; `node scripts/generate-types.mjs --check` fails when the checked-in file is
// out of date (the tests run that).
import { readFile, writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { compile } from "json-schema-to-typescript";

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const schemaPath = here("../../../docs/schema/taskpods.json");
const outPath = here("../src/types.ts");

export async function generate() {
  const schema = JSON.parse(await readFile(schemaPath, "utf8"));
  return compile(schema, "TaskpodsMessage", {
    bannerComment:
      "// The taskpods wire types, generated from docs/schema/taskpods.json by scripts/generate-types.mjs.\n" +
      "// Do not edit: change the Rust types, regenerate the schemas, then run `npm run generate`.",
    unreachableDefinitions: true,
    additionalProperties: false,
    strictIndexSignatures: false,
    format: true,
    style: { printWidth: 120 },
  });
}

const text = await generate();
if (process.argv.includes("--check")) {
  const current = await readFile(outPath, "utf8").catch(() => "");
  if (current !== text) {
    console.error("src/types.ts is out of date with docs/schema/taskpods.json: run `npm run generate`");
    process.exit(1);
  }
} else {
  await writeFile(outPath, text);
  console.log(`wrote ${outPath}`);
}
