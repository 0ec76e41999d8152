//! `docs/schema/` is the contract for Brains in other languages: JSON Schemas generated from the Rust types
//! of every command, reply, event, agent message and view. This test fails when the types change and the
//! checked-in schemas do not (and says how to regenerate), and validates the examples in
//! `docs/PROTOCOL.md` against them with a validator that is not ours (Python's `jsonschema`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use taskpods_events::{
    AgentReport, CancelTask, CommandReply, Event, HelloReply, LaunchTask, TaskState,
};
use taskpods_projections::buckets::Pointer;
use taskpods_projections::{ActiveView, FinishedView, HistoryView, TaskView};

const REGENERATE: &str =
    "TASKPODS_WRITE_SCHEMAS=1 cargo test -p taskpods-integration --test schema";

fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/schema")
}

/// One wire type: its file name, its schema as a file of its own, and its reference in the bundle.
struct WireType {
    name: &'static str,
    root: fn() -> Schema,
    bundled: fn(&mut SchemaGenerator) -> Schema,
}

fn wire_type<T: JsonSchema>(name: &'static str) -> WireType {
    WireType {
        name,
        root: || {
            SchemaSettings::draft2020_12()
                .into_generator()
                .into_root_schema_for::<T>()
        },
        bundled: |generator| generator.subschema_for::<T>(),
    }
}

/// Every type on the wire or in the views.
fn wire_types() -> [WireType; 12] {
    [
        wire_type::<LaunchTask>("launch-task"),
        wire_type::<CancelTask>("cancel-task"),
        wire_type::<CommandReply>("command-reply"),
        wire_type::<Event>("event"),
        wire_type::<AgentReport>("agent-report"),
        wire_type::<HelloReply>("hello-reply"),
        wire_type::<TaskState>("task-state"),
        wire_type::<TaskView>("task-view"),
        wire_type::<HistoryView>("history-view"),
        wire_type::<ActiveView>("active-view"),
        wire_type::<FinishedView>("finished-view"),
        wire_type::<Pointer>("view-pointer"),
    ]
}

/// Every wire type's schema by file name (without `.json`), plus `taskpods`: all of them in one file
/// (`$defs`), for code generators (the TypeScript client's types come from it).
fn schemas() -> BTreeMap<&'static str, serde_json::Value> {
    let mut out = BTreeMap::new();
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let mut refs = Vec::new();
    for wire in wire_types() {
        out.insert(wire.name, (wire.root)().to_value());
        refs.push((wire.bundled)(&mut generator).to_value());
    }
    let bundle = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "TaskpodsMessage",
        "description": "Every message and view of the taskpods wire protocol (docs/PROTOCOL.md); each type is in $defs.",
        "anyOf": refs,
        "$defs": generator.take_definitions(true),
    });
    out.insert("taskpods", bundle);
    out
}

fn pretty(value: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap();
    text.push('\n');
    text
}

#[test]
fn checked_in_schemas_match_the_rust_types() {
    let dir = schema_dir();
    let schemas = schemas();
    if std::env::var_os("TASKPODS_WRITE_SCHEMAS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                std::fs::remove_file(path).unwrap();
            }
        }
        for (name, schema) in &schemas {
            std::fs::write(dir.join(format!("{name}.json")), pretty(schema)).unwrap();
        }
    }
    let mut stale = Vec::new();
    for (name, schema) in &schemas {
        let path = dir.join(format!("{name}.json"));
        match std::fs::read_to_string(&path) {
            Ok(text) if text == pretty(schema) => {}
            Ok(_) => stale.push(format!(
                "docs/schema/{name}.json differs from the Rust types"
            )),
            Err(e) => stale.push(format!("docs/schema/{name}.json: {e}")),
        }
    }
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".json")
            && !schemas.contains_key(name)
        {
            stale.push(format!("docs/schema/{file} belongs to no type"));
        }
    }
    assert!(
        stale.is_empty(),
        "{}\nThe wire types changed: regenerate the schemas with\n    {REGENERATE}\nthen the \
         TypeScript types with `npm run generate` in clients/typescript, and review the diff.",
        stale.join("\n")
    );
}

/// The JSON examples of `docs/PROTOCOL.md` marked `<!-- schema: NAME -->`, each with where it is.
fn protocol_examples() -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/PROTOCOL.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut cases = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let marker = lines[i]
            .trim()
            .strip_prefix("<!-- schema:")
            .and_then(|rest| rest.strip_suffix("-->"));
        let Some(schema) = marker.map(str::trim) else {
            i += 1;
            continue;
        };
        assert_eq!(
            lines.get(i + 1).map(|l| l.trim()),
            Some("```json"),
            "PROTOCOL.md line {}: a schema marker must be followed by a ```json block",
            i + 1
        );
        let start = i + 2;
        let end = start
            + lines[start..]
                .iter()
                .position(|l| l.trim() == "```")
                .expect("the block ends");
        let block = lines[start..end].join("\n");
        // One JSON value per block, or one per line (the replies).
        let values: Vec<(usize, serde_json::Value)> = match serde_json::from_str(&block) {
            Ok(value) => vec![(start + 1, value)],
            Err(_) => lines[start..end]
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(n, l)| {
                    let value = serde_json::from_str(l).unwrap_or_else(|e| {
                        panic!("PROTOCOL.md line {}: not JSON: {e}", start + n + 1)
                    });
                    (start + n + 1, value)
                })
                .collect(),
        };
        for (line, value) in values {
            cases.push(serde_json::json!({
                "schema": schema,
                "where": format!("PROTOCOL.md line {line}"),
                "value": value,
            }));
        }
        i = end + 1;
    }
    cases
}

#[test]
fn protocol_examples_validate_against_the_schemas() {
    let cases = protocol_examples();
    let schemas: Vec<&str> = cases.iter().filter_map(|c| c["schema"].as_str()).collect();
    for needed in ["launch-task", "command-reply", "event", "task-view"] {
        assert!(
            schemas.contains(&needed),
            "no {needed} example: {schemas:?}"
        );
    }
    let mut child = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/validate_json.py"
        ))
        .arg(schema_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(&serde_json::to_vec(&cases).unwrap())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "PROTOCOL.md examples do not match docs/schema (scripts/install-test-deps installs `jsonschema`):\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(&format!("summary: {} values ok, 0 wrong", cases.len())),
        "{report}"
    );
}
