"""Reads taskpods messages the way a Brain in another language does: with the `msgpack` package, not Rust.

Usage: check_msgpack.py DIR [SCHEMA_DIR]

DIR holds pairs NAME.msgpack (as taskpods writes it on the wire) and NAME.json (the same value as taskpods'
JSON encoding); NAME is `<schema>--<label>`. Each msgpack message must decode to exactly the JSON value (so
ids are hyphenated strings, not 16 raw bytes), and, when SCHEMA_DIR is given, validate against
SCHEMA_DIR/<schema>.json. Prints one line per message and a summary; exits 1 on any mismatch.
"""

import json
import pathlib
import re
import sys

import msgpack

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ID_FIELDS = ("id", "task", "task_id")


def main() -> int:
    folder = pathlib.Path(sys.argv[1])
    schemas = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else None
    validators = {}
    failures = []
    count = 0
    for packed in sorted(folder.glob("*.msgpack")):
        name = packed.stem
        schema_name = name.split("--")[0]
        decoded = msgpack.unpackb(packed.read_bytes(), raw=False)
        expected = json.loads(packed.with_suffix(".json").read_text())
        problems = []
        if decoded != expected:
            problems.append(f"msgpack decodes to {decoded!r}, JSON says {expected!r}")
        for field in ID_FIELDS:
            if field in decoded and not (isinstance(decoded[field], str) and UUID.match(decoded[field])):
                problems.append(f"{field} is {decoded[field]!r}, not a hyphenated UUID string")
        if schemas is not None:
            if schema_name not in validators:
                import jsonschema

                schema = json.loads((schemas / f"{schema_name}.json").read_text())
                cls = jsonschema.validators.validator_for(schema)
                validators[schema_name] = cls(schema, format_checker=cls.FORMAT_CHECKER)
            for error in validators[schema_name].iter_errors(decoded):
                path = "/".join(str(p) for p in error.absolute_path) or "."
                problems.append(f"schema {schema_name}: at {path}: {error.message}")
        count += 1
        if problems:
            failures.append(name)
            for p in problems:
                print(f"FAIL {name}: {p}")
        else:
            print(f"ok   {name}")
    print(f"summary: {count - len(failures)} messages ok, {len(failures)} wrong")
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
