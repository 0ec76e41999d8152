// Validators for docs/schema/*.json (generated from the Rust types), with Ajv: a JSON Schema validator
// that is not ours. The numeric formats schemars writes (`uint64`, `int32`, `float`, …) are checked for
// what they say: integers in range, finite numbers.

import { readFileSync } from "node:fs";
import { join } from "node:path";

import { Ajv2020, type ValidateFunction } from "ajv/dist/2020.js";
import addFormatsModule from "ajv-formats";

import { REPO } from "./harness.js";

const addFormats = addFormatsModule as unknown as (ajv: Ajv2020) => Ajv2020;

function integerIn(min: number, max: number) {
  return { type: "number" as const, validate: (x: number) => Number.isInteger(x) && x >= min && x <= max };
}

const ajv = new Ajv2020({ allErrors: true, strict: true });
addFormats(ajv);
// `uint` is schemars's format for Rust's usize (sizes and counts): a non-negative integer JS can hold.
ajv.addFormat("uint", integerIn(0, Number.MAX_SAFE_INTEGER));
ajv.addFormat("uint16", integerIn(0, 0xffff));
ajv.addFormat("uint32", integerIn(0, 0xffff_ffff));
ajv.addFormat("uint64", integerIn(0, Number.MAX_SAFE_INTEGER));
ajv.addFormat("int32", integerIn(-0x8000_0000, 0x7fff_ffff));
ajv.addFormat("float", { type: "number", validate: (x: number) => Number.isFinite(x) });

const compiled = new Map<string, ValidateFunction>();

/** The validator of docs/schema/<name>.json. */
export function validator(name: string): ValidateFunction {
  let v = compiled.get(name);
  if (v === undefined) {
    const schema = JSON.parse(readFileSync(join(REPO, "docs", "schema", `${name}.json`), "utf8"));
    v = ajv.compile(schema);
    compiled.set(name, v);
  }
  return v;
}

/** Throws with every error when `value` does not validate against docs/schema/<name>.json. */
export function assertValid(name: string, value: unknown, where: string): void {
  const v = validator(name);
  if (!v(value)) {
    throw new Error(`${where} does not match docs/schema/${name}.json: ${ajv.errorsText(v.errors)}\n${JSON.stringify(value)}`);
  }
}
