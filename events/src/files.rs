//! Files in and out of a task: inputs named in the launch, artifacts the code leaves in `/tmp/out`, the
//! per-task limits on both, and the request/reply messages the agent and the engine exchange to move them.
//!
//! The bytes live in the JetStream object store bucket `<prefix>_files`. A Brain puts inputs there and
//! names them in its launch; the agent never touches the object store itself (a task's NATS identity may
//! not reach `$O.>`): it asks the engine for its inputs chunk by chunk on `<p>.agent.<task>.files.get`
//! and hands artifacts over chunk by chunk on `<p>.agent.<task>.files.put`. The engine serves only the
//! inputs named in the task's own launch and writes artifacts only under `<task>/out/`.
//!
//! Object names: inputs the CLI and clients put are `<task>/in/<name>` ([`input_object`]); artifacts are
//! `<task>/out/<path>` ([`artifact_object`]). Paths are relative, `/`-separated, without `.`, `..` or
//! empty components ([`check_relative_path`]).

use std::collections::BTreeSet;
use std::fmt;

use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Problem, TaskId};

const MIB: u64 = 1024 * 1024;

/// The longest relative path of an input or artifact, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// The longest single path component, in bytes (what most file systems allow).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// The longest object name a launch may name, in bytes.
pub const MAX_OBJECT_NAME_BYTES: usize = 1024;

/// An input named in a launch: the object to fetch and where the code finds it (`/tmp/in/<path>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputFile {
    /// The input's name; the agent asks for it by this name. Also its path when `path` is absent.
    pub name: String,
    /// The object in the files bucket holding its bytes (e.g. `<task>/in/<name>`).
    pub object: String,
    /// Where under `/tmp/in` the code finds it; `name` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The size the caller expects, in bytes; checked against the stored object when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The digest the caller expects (`SHA-256=<base64url>`, as the object store writes it); checked
    /// against the stored object when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl InputFile {
    /// Where under `/tmp/in` the input goes.
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or(&self.name)
    }
}

/// Per-task limits on inputs and artifacts. On Kubernetes both live in the pod's size-limited `/tmp`
/// emptyDir, so `max_input_bytes + max_artifact_bytes` must fit in it ([`FileLimits::fits_in`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct FileLimits {
    /// Most inputs a launch may name.
    pub max_inputs: usize,
    /// Largest total size of a task's inputs, bytes.
    pub max_input_bytes: u64,
    /// Most artifacts kept from one task; the rest are counted as truncated.
    pub max_artifacts: u64,
    /// Largest total size of a task's artifacts, bytes; the rest are counted as truncated.
    pub max_artifact_bytes: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        Self {
            max_inputs: 32,
            max_input_bytes: 64 * MIB,
            max_artifacts: 64,
            max_artifact_bytes: 64 * MIB,
        }
    }
}

impl FileLimits {
    /// Whether inputs and artifacts at their caps fit in a `/tmp` of `tmp_bytes` (leaving the code a
    /// quarter of it to work in).
    pub fn fits_in(&self, tmp_bytes: u64) -> bool {
        self.max_input_bytes
            .saturating_add(self.max_artifact_bytes)
            .saturating_add(tmp_bytes / 4)
            <= tmp_bytes
    }
}

/// The object name under which the CLI and the clients put input `name` of `task`.
pub fn input_object(task: TaskId, name: &str) -> String {
    format!("{task}/in/{name}")
}

/// The object name of `task`'s artifact at `path` (relative to `/tmp/out`).
pub fn artifact_object(task: TaskId, path: &str) -> String {
    format!("{}{path}", artifacts_prefix(task))
}

/// The prefix of every artifact object of `task`.
pub fn artifacts_prefix(task: TaskId) -> String {
    format!("{task}/out/")
}

/// The prefix of every object that belongs to `task` (its inputs put by the CLI and its artifacts).
pub fn task_prefix(task: TaskId) -> String {
    format!("{task}/")
}

/// Why a relative path is not acceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    /// Nothing at all.
    #[error("must not be empty")]
    Empty,
    /// Longer than [`MAX_PATH_BYTES`], or a component longer than [`MAX_COMPONENT_BYTES`].
    #[error("is too long (at most 1024 bytes, 255 per component)")]
    TooLong,
    /// Starts with `/`.
    #[error("must be relative (no leading '/')")]
    Absolute,
    /// Has an empty, `.` or `..` component: it could name something outside its directory.
    #[error("must not contain empty, '.' or '..' components")]
    Escapes,
    /// Holds NUL, a control character or a backslash.
    #[error("must not contain control characters or '\\'")]
    BadCharacter,
}

/// Checks a `/`-separated relative path as inputs and artifacts use it.
pub fn check_relative_path(path: &str) -> Result<(), PathProblem> {
    if path.is_empty() {
        return Err(PathProblem::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathProblem::TooLong);
    }
    if path.starts_with('/') {
        return Err(PathProblem::Absolute);
    }
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return Err(PathProblem::BadCharacter);
    }
    for component in path.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(PathProblem::Escapes);
        }
        if component.len() > MAX_COMPONENT_BYTES {
            return Err(PathProblem::TooLong);
        }
    }
    Ok(())
}

/// Checks the inputs of a launch against `limits`, adding every problem (with its field path) to
/// `problems`; returns the inputs with their paths resolved.
pub fn validate_inputs(
    inputs: &[InputFile],
    limits: &FileLimits,
    problems: &mut Vec<Problem>,
) -> Vec<InputFile> {
    if inputs.len() > limits.max_inputs {
        problems.push(Problem::new(
            "inputs",
            format!(
                "has {} inputs; at most {} are allowed",
                inputs.len(),
                limits.max_inputs
            ),
        ));
    }
    let mut names = BTreeSet::new();
    let mut paths = BTreeSet::new();
    let mut declared: u64 = 0;
    for (i, input) in inputs.iter().enumerate() {
        let field = |what: &str| format!("inputs[{i}].{what}");
        if input.name.is_empty()
            || input.name.len() > MAX_PATH_BYTES
            || input.name.chars().any(char::is_control)
        {
            problems.push(Problem::new(
                field("name"),
                "must be 1 to 1024 bytes without control characters",
            ));
        } else if !names.insert(input.name.as_str()) {
            problems.push(Problem::new(
                field("name"),
                format!("{:?} is named twice", input.name),
            ));
        }
        if input.object.is_empty()
            || input.object.len() > MAX_OBJECT_NAME_BYTES
            || input.object.chars().any(char::is_control)
        {
            problems.push(Problem::new(
                field("object"),
                "must be 1 to 1024 bytes without control characters",
            ));
        }
        let path = input.path();
        let path_field = if input.path.is_some() { "path" } else { "name" };
        match check_relative_path(path) {
            Err(problem) => problems.push(Problem::new(
                field(path_field),
                format!("{path:?} as a path under /tmp/in {problem}"),
            )),
            Ok(()) => {
                // `a` and `a/b` cannot both be files.
                let clash = paths.iter().any(|other: &String| {
                    other == path
                        || other.starts_with(&format!("{path}/"))
                        || path.starts_with(&format!("{other}/"))
                });
                if clash {
                    problems.push(Problem::new(
                        field(path_field),
                        format!("{path:?} clashes with another input's path"),
                    ));
                }
                paths.insert(path.to_owned());
            }
        }
        if let Some(size) = input.size {
            declared = declared.saturating_add(size);
            if size > limits.max_input_bytes {
                problems.push(Problem::new(
                    field("size"),
                    format!(
                        "is {size} bytes; at most {} bytes of inputs are allowed per task",
                        limits.max_input_bytes
                    ),
                ));
            }
        }
        if let Some(digest) = &input.digest
            && !is_digest(digest)
        {
            problems.push(Problem::new(
                field("digest"),
                "must be SHA-256=<base64url of the 32-byte SHA-256>, as the object store writes it",
            ));
        }
    }
    if declared > limits.max_input_bytes
        && inputs
            .iter()
            .all(|i| i.size.unwrap_or(0) <= limits.max_input_bytes)
    {
        problems.push(Problem::new(
            "inputs",
            format!(
                "add up to {declared} bytes; at most {} bytes of inputs are allowed per task",
                limits.max_input_bytes
            ),
        ));
    }
    inputs
        .iter()
        .map(|input| InputFile {
            path: Some(input.path().to_owned()),
            ..input.clone()
        })
        .collect()
}

/// Whether `text` looks like an object store digest: `SHA-256=` and 44 characters of base64url.
pub fn is_digest(text: &str) -> bool {
    text.strip_prefix("SHA-256=").is_some_and(|b64| {
        b64.len() == 44
            && b64.ends_with('=')
            && b64[..43]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// One artifact as stored: its path under `/tmp/out`, size and digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Artifact {
    /// Relative to `/tmp/out`; the object is `<task>/out/<path>`.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// `SHA-256=<base64url>`, as the object store records it.
    pub digest: String,
}

/// What the caps left out: counted, not stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ArtifactsTruncated {
    /// Files not uploaded because the count or byte cap was reached.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// What `/tmp/out` held when the agent stopped the code for going past its limit. The local sandbox's
/// `/tmp/out` lives on the host (so it outlives the sandbox) and is not inside the sandbox's size-limited
/// `/tmp`: the agent measures it while the code runs and holds it to the same size as that `/tmp`, as the
/// pod's size-limited `/tmp` holds it in Kubernetes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OutDirExceeded {
    /// The most bytes of disk `/tmp/out` may use (what `du` counts).
    pub limit_bytes: u64,
    /// The most files and directories it may hold.
    pub limit_entries: u64,
    /// The bytes of disk measured when the code was stopped.
    pub used_bytes: u64,
    /// The files and directories counted when the code was stopped.
    pub entries: u64,
}

impl fmt::Display for OutDirExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "/tmp/out went past its limit ({} bytes in {} entries; at most {} bytes and {} entries): \
             the code was stopped",
            self.used_bytes, self.entries, self.limit_bytes, self.limit_entries
        )
    }
}

/// Something in `/tmp/out` that was not uploaded, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SkippedArtifact {
    /// Its path under `/tmp/out` (lossy UTF-8).
    pub path: String,
    /// Why: `symlink`, `not a regular file`, `bad path`, `unreadable`, `refused`.
    pub reason: String,
}

/// Why a task's inputs could not be provided; the task fails with the matching reason before its code
/// runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputProblem {
    /// The object is not in the files bucket.
    Missing,
    /// The object (or all inputs together) is over the per-task cap.
    TooLarge,
    /// The object's size or digest differs from what the launch said, or its bytes from its digest.
    Corrupt,
    /// The engine or the object store could not be reached in time.
    Unavailable,
    /// A problem this version does not know.
    #[serde(other)]
    Unknown,
}

impl InputProblem {
    /// The reason the task fails with.
    pub fn failure_reason(self) -> crate::FailureReason {
        use crate::FailureReason as R;
        match self {
            Self::Missing => R::InputMissing,
            Self::TooLarge => R::InputTooLarge,
            Self::Corrupt => R::InputCorrupt,
            Self::Unavailable | Self::Unknown => R::InputUnavailable,
        }
    }
}

/// The agent's report that an input could not be provided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InputFailure {
    /// What went wrong.
    pub problem: InputProblem,
    /// The input's name.
    pub input: String,
    /// Details for a person.
    pub message: String,
}

/// Why the engine refused a file request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileRefusal {
    /// The input's object is not in the bucket.
    InputMissing,
    /// The input (or the task's inputs together) is over the cap.
    InputTooLarge,
    /// The input's size or digest differs from what the launch said, or its bytes from its digest.
    InputCorrupt,
    /// The task's launch names no such input: a task reads only its own inputs.
    NotAnInput,
    /// The artifact path is not a clean relative path.
    BadPath,
    /// The task's artifacts are over the count or byte cap.
    OverCap,
    /// The chunk does not continue the upload in progress (restart the file from offset 0).
    OutOfOrder,
    /// The task is not in a state that moves files (not running, or ended too long ago).
    NotNow,
    /// The object store failed; retry.
    Unavailable,
    /// A code this version does not know.
    #[serde(other)]
    Unknown,
}

impl FileRefusal {
    /// The input problem this refusal means for the task, if it is about an input.
    pub fn input_problem(self) -> Option<InputProblem> {
        match self {
            Self::InputMissing | Self::NotAnInput => Some(InputProblem::Missing),
            Self::InputTooLarge => Some(InputProblem::TooLarge),
            Self::InputCorrupt => Some(InputProblem::Corrupt),
            _ => None,
        }
    }
}

impl fmt::Display for FileRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self {
            Self::InputMissing => "input_missing",
            Self::InputTooLarge => "input_too_large",
            Self::InputCorrupt => "input_corrupt",
            Self::NotAnInput => "not_an_input",
            Self::BadPath => "bad_path",
            Self::OverCap => "over_cap",
            Self::OutOfOrder => "out_of_order",
            Self::NotNow => "not_now",
            Self::Unavailable => "unavailable",
            Self::Unknown => "unknown",
        };
        f.write_str(code)
    }
}

/// The agent asks for the bytes of one of its inputs from `offset` on (`<p>.agent.<task>.files.get`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileGet {
    /// The input's name, as in the launch.
    pub input: String,
    /// The first byte wanted.
    #[serde(default)]
    pub offset: u64,
}

/// The engine's answer to a [`FileGet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum FileGetReply {
    /// Bytes of the input from `offset`.
    Chunk {
        /// Where `data` starts.
        offset: u64,
        /// The input's whole size.
        size: u64,
        /// The input's digest.
        digest: String,
        /// The bytes (msgpack bin).
        #[schemars(with = "Vec<u8>")]
        data: Bytes,
        /// Whether `data` ends the input.
        last: bool,
    },
    /// Not served.
    Refused {
        /// Why, as a code.
        code: FileRefusal,
        /// Why, in words.
        message: String,
    },
}

/// The agent hands over a chunk of an artifact (`<p>.agent.<task>.files.put`). Chunks of one file come
/// in order; offset 0 starts (or restarts) the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FilePut {
    /// The artifact's path under `/tmp/out`.
    pub path: String,
    /// Where `data` starts in the file.
    pub offset: u64,
    /// The bytes (msgpack bin).
    #[schemars(with = "Vec<u8>")]
    pub data: Bytes,
    /// Whether this chunk ends the file.
    pub last: bool,
}

/// The engine's answer to a [`FilePut`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum FilePutReply {
    /// Taken; send the chunk starting at `next_offset`.
    Accepted {
        /// The next byte expected.
        next_offset: u64,
    },
    /// The file is stored.
    Stored(Artifact),
    /// Not taken.
    Refused {
        /// Why, as a code.
        code: FileRefusal,
        /// Why, in words.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str) -> InputFile {
        InputFile {
            name: name.into(),
            object: format!("t/in/{name}"),
            path: None,
            size: None,
            digest: None,
        }
    }

    #[test]
    fn paths_that_could_leave_their_directory_are_refused() {
        for good in ["a", "a/b.bin", "dir/sub/file with space.txt", "ünïcode"] {
            assert_eq!(check_relative_path(good), Ok(()), "{good}");
        }
        assert_eq!(check_relative_path(""), Err(PathProblem::Empty));
        assert_eq!(
            check_relative_path("/etc/passwd"),
            Err(PathProblem::Absolute)
        );
        for bad in ["../x", "a/../../x", "a//b", "./a", "a/", "a/."] {
            assert_eq!(check_relative_path(bad), Err(PathProblem::Escapes), "{bad}");
        }
        assert_eq!(check_relative_path("a\0b"), Err(PathProblem::BadCharacter));
        assert_eq!(
            check_relative_path("a\\..\\b"),
            Err(PathProblem::BadCharacter)
        );
        assert_eq!(
            check_relative_path(&"x".repeat(256)),
            Err(PathProblem::TooLong)
        );
    }

    #[test]
    fn every_input_problem_is_reported_with_its_field() {
        let limits = FileLimits {
            max_inputs: 4,
            max_input_bytes: 100,
            ..FileLimits::default()
        };
        let inputs = vec![
            input("data.csv"),
            input("data.csv"),
            InputFile {
                path: Some("../etc/passwd".into()),
                ..input("escape")
            },
            InputFile {
                size: Some(101),
                digest: Some("md5:abc".into()),
                object: String::new(),
                ..input("big")
            },
            input("data.csv/inner"),
        ];
        let mut problems = Vec::new();
        validate_inputs(&inputs, &limits, &mut problems);
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "inputs",
                "inputs[1].name",
                "inputs[1].name",
                "inputs[2].path",
                "inputs[3].object",
                "inputs[3].size",
                "inputs[3].digest",
                "inputs[4].name",
            ]
        );
        assert!(problems[3].message.contains("'..'"), "{}", problems[3]);
        assert!(problems[7].message.contains("clashes"), "{}", problems[7]);
    }

    #[test]
    fn declared_sizes_add_up_against_the_cap_and_paths_default_to_names() {
        let limits = FileLimits {
            max_input_bytes: 100,
            ..FileLimits::default()
        };
        let inputs = vec![
            InputFile {
                size: Some(60),
                ..input("a")
            },
            InputFile {
                size: Some(60),
                path: Some("dir/b".into()),
                ..input("b")
            },
        ];
        let mut problems = Vec::new();
        let resolved = validate_inputs(&inputs, &limits, &mut problems);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("add up to 120 bytes"));
        assert_eq!(resolved[0].path.as_deref(), Some("a"));
        assert_eq!(resolved[1].path.as_deref(), Some("dir/b"));
    }

    #[test]
    fn digests_are_the_object_stores_format() {
        assert!(is_digest(
            "SHA-256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU="
        ));
        assert!(!is_digest("SHA-256=47DEQpj8HBSa"));
        assert!(!is_digest(
            "sha256:47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU="
        ));
    }

    #[test]
    fn a_result_reporting_an_input_failure_fails_the_task_with_the_inputs_reason() {
        use crate::{
            EventBody, FailureReason, Input, LaunchPolicy, LaunchTask, Task, TaskOutcome, decide,
            evolve, stamp,
        };
        let id = TaskId::from_idempotency_key("files");
        let at = chrono::Utc::now();
        let mut task = Task::default();
        let launch = LaunchTask {
            inputs: vec![input("data.csv")],
            ..LaunchTask::script("cat /tmp/in/data.csv")
        };
        for step in [
            Input::Launch {
                spec: launch.validate(&LaunchPolicy::default()),
                at,
            },
            Input::JobCreated { job: "j".into() },
            Input::AgentHello,
        ] {
            let bodies = decide(&task, &step).expect("valid");
            for event in stamp(id, &task, at, bodies) {
                task = evolve(task, &event);
            }
        }
        assert_eq!(
            task.spec.as_ref().map(|s| s.inputs[0].path()),
            Some("data.csv")
        );
        let outcome = TaskOutcome {
            input_failure: Some(InputFailure {
                problem: InputProblem::Missing,
                input: "data.csv".into(),
                message: "not in the files bucket".into(),
            }),
            ..TaskOutcome::default()
        };
        // The one event the agent's result decides, as (reason, message) of a failure.
        let failure = |outcome: TaskOutcome| match &decide(&task, &Input::AgentResult(outcome))
            .expect("decided")[..]
        {
            [
                EventBody::Failed {
                    reason, message, ..
                },
            ] => (*reason, message.clone().unwrap_or_default()),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            failure(outcome),
            (
                FailureReason::InputMissing,
                "not in the files bucket".to_owned()
            )
        );
        assert_eq!(
            InputProblem::TooLarge.failure_reason().to_string(),
            "input_too_large"
        );
        // `/tmp/out` past its limit: evicted, as a pod past its `/tmp` would be, whatever the exit code.
        let over = OutDirExceeded {
            limit_bytes: 4 << 20,
            limit_entries: 10_000,
            used_bytes: 5 << 20,
            entries: 3,
        };
        let outcome = TaskOutcome {
            exit_code: 0,
            out_dir_exceeded: Some(Box::new(over)),
            ..TaskOutcome::default()
        };
        let (reason, message) = failure(outcome);
        assert_eq!(reason, FailureReason::Evicted);
        assert!(message.contains("5242880 bytes"), "{message}");
    }

    #[test]
    fn file_messages_carry_bytes_as_msgpack_bin() {
        let put = FilePut {
            path: "out.bin".into(),
            offset: 0,
            data: Bytes::from_static(&[0, 255, 128, 7]),
            last: true,
        };
        let bytes = crate::codec::to_msgpack(&put).expect("encodes");
        // bin 8 header (0xc4, length 4) then the raw bytes: no per-byte integer encoding.
        let at = bytes
            .windows(6)
            .position(|w| w == [0xc4, 4, 0, 255, 128, 7]);
        assert!(at.is_some(), "{bytes:?}");
        let back: FilePut =
            crate::codec::decode("put", &bytes, crate::Encoding::Msgpack).expect("decodes");
        assert_eq!(back, put);
    }
}
