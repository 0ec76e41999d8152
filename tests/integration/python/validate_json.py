"""Validates JSON values against taskpods' schemas with Python's `jsonschema` (a validator that is not ours).

Usage: validate_json.py SCHEMA_DIR < cases.json, where cases.json is a list of {"schema", "where", "value"}:
`schema` names SCHEMA_DIR/<schema>.json, `where` says where the value came from (for the report). Prints one
line per case and a summary; exits 1 when any value does not validate.
"""

import json
import pathlib
import sys

import jsonschema


def main() -> int:
    folder = pathlib.Path(sys.argv[1])
    cases = json.load(sys.stdin)
    wrong = 0
    for case in cases:
        schema = json.loads((folder / f"{case['schema']}.json").read_text())
        cls = jsonschema.validators.validator_for(schema)
        errors = list(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(case["value"]))
        if errors:
            wrong += 1
            for error in errors:
                path = "/".join(str(p) for p in error.absolute_path) or "."
                print(f"FAIL {case['where']} ({case['schema']}): at {path}: {error.message}")
        else:
            print(f"ok   {case['where']} ({case['schema']})")
    print(f"summary: {len(cases) - wrong} values ok, {wrong} wrong")
    return 1 if wrong or not cases else 0


if __name__ == "__main__":
    sys.exit(main())
