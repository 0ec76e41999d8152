//! Launch policy: the limits and defaults a [`LaunchTask`] is validated against, the validation itself
//! (every problem at once, each with its field), and Kubernetes quantity parsing.
//!
//! A launch is validated once, at intake; the resulting [`TaskSpec`] is stored in the `Accepted` event, so
//! later steps never re-validate and never see a value outside the caps.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::command::{LaunchTask, MAX_TIMEOUT_SECS, Mode, ResourceRequest, Resources, TaskSpec};
use crate::env::EnvValue;
use crate::files::FileLimits;

/// The limits and defaults launches are validated against (engine configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LaunchPolicy {
    /// Toolbox name → container image.
    pub toolboxes: BTreeMap<String, String>,
    /// The toolbox used when a launch names neither image nor toolbox.
    pub default_toolbox: String,
    /// Whether launches may name an arbitrary image instead of a toolbox.
    pub allow_any_image: bool,
    /// Largest script or goal, in bytes.
    pub max_script_bytes: usize,
    /// Most environment variables.
    pub max_env: usize,
    /// Largest total size of environment names and values, in bytes.
    pub max_env_bytes: usize,
    /// Most labels.
    pub max_labels: usize,
    /// Timeout when the launch gives none, in seconds.
    pub default_timeout_secs: u32,
    /// CPU request and limit when the launch gives none, in millicores.
    pub default_cpu_millis: u64,
    /// Memory request and limit when the launch gives none, in bytes.
    pub default_memory_bytes: u64,
    /// Largest CPU limit a launch may ask for, in millicores.
    pub max_cpu_millis: u64,
    /// Largest memory limit a launch may ask for, in bytes.
    pub max_memory_bytes: u64,
    /// Per-task limits on inputs and artifacts.
    pub files: FileLimits,
    /// Whether launches may take env values from Kubernetes Secrets (`secret_env`). Not configured: the
    /// engine sets it when its backend is Kubernetes, the only one that can honour it.
    #[serde(skip)]
    pub allow_secret_env: bool,
}

impl Default for LaunchPolicy {
    fn default() -> Self {
        Self {
            toolboxes: BTreeMap::from([(
                "default".to_owned(),
                "ghcr.io/taskpods/task-runner:latest".to_owned(),
            )]),
            default_toolbox: "default".to_owned(),
            allow_any_image: false,
            max_script_bytes: 256 * 1024,
            max_env: 64,
            max_env_bytes: 64 * 1024,
            max_labels: 16,
            default_timeout_secs: MAX_TIMEOUT_SECS,
            default_cpu_millis: 500,
            default_memory_bytes: 512 * MIB,
            max_cpu_millis: 2000,
            max_memory_bytes: 4 * 1024 * MIB,
            files: FileLimits::default(),
            allow_secret_env: false,
        }
    }
}

const MIB: u64 = 1024 * 1024;

/// One thing wrong with a launch: where, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Problem {
    /// The field path, e.g. `resources.memory_limit` or `env.PATH`.
    pub field: String,
    /// What is wrong, in words a person can act on.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl LaunchTask {
    /// Checks every field against `policy`; returns the resolved spec or every problem found (not just
    /// the first), so a caller fixes its request in one go.
    pub fn validate(&self, policy: &LaunchPolicy) -> Result<TaskSpec, Vec<Problem>> {
        let mut problems = Vec::new();

        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > 256)
        {
            problems.push(Problem::new(
                "idempotency_key",
                "must be 1 to 256 bytes long",
            ));
        }
        // Everything that reaches a process, a header, a Kubernetes object or a person's terminal: no
        // NUL (it would end or split an argument handed on as text) and no other control character,
        // except tab and newline where a script or a value needs them.
        let texts = [
            (
                "idempotency_key",
                self.idempotency_key.as_deref(),
                NO_CONTROLS,
            ),
            ("image", self.image.as_deref(), NO_CONTROLS),
            ("toolbox", self.toolbox.as_deref(), NO_CONTROLS),
            ("script", self.script.as_deref(), TAB_AND_NEWLINE),
            ("goal", self.goal.as_deref(), TAB_AND_NEWLINE),
            ("requester", self.requester.as_deref(), NO_CONTROLS),
        ];
        for (field, text, allowed) in texts {
            if let Some(problem) = text.and_then(|t| control_problem(field, t, allowed)) {
                problems.push(problem);
            }
        }
        for (name, value) in &self.env {
            let field = format!("env.{}", name.escape_debug());
            if let Some(problem) = control_problem(&field, value, TAB_AND_NEWLINE) {
                problems.push(problem);
            }
        }

        let (image, toolbox) = match (&self.image, &self.toolbox) {
            (Some(_), Some(_)) => {
                problems.push(Problem::new(
                    "image",
                    "give either image or toolbox, not both",
                ));
                (String::new(), None)
            }
            (Some(image), None) => {
                if !policy.allow_any_image {
                    problems.push(Problem::new(
                        "image",
                        format!(
                            "arbitrary images are not allowed here; use a toolbox ({})",
                            known(policy)
                        ),
                    ));
                } else if image.is_empty()
                    || image.len() > 512
                    || image.contains(char::is_whitespace)
                {
                    problems.push(Problem::new(
                        "image",
                        "must be a container image reference without spaces, at most 512 bytes",
                    ));
                }
                (image.clone(), None)
            }
            (None, name) => {
                let name = name.as_deref().unwrap_or(&policy.default_toolbox);
                match policy.toolboxes.get(name) {
                    Some(image) => (image.clone(), Some(name.to_owned())),
                    None => {
                        problems.push(Problem::new(
                            "toolbox",
                            format!("unknown toolbox {name:?}; known: {}", known(policy)),
                        ));
                        (String::new(), None)
                    }
                }
            }
        };

        let (field, instructions) = match self.mode {
            Mode::Script => ("script", &self.script),
            Mode::Agent => ("goal", &self.goal),
        };
        let other = if self.mode == Mode::Script {
            ("goal", &self.goal)
        } else {
            ("script", &self.script)
        };
        if other.1.is_some() {
            problems.push(Problem::new(
                other.0,
                format!("not used in mode {:?}; give {field} instead", self.mode),
            ));
        }
        let instructions = match instructions {
            None => {
                problems.push(Problem::new(field, "is required"));
                String::new()
            }
            Some(text) if text.trim().is_empty() => {
                problems.push(Problem::new(field, "must not be empty"));
                String::new()
            }
            Some(text) if text.len() > policy.max_script_bytes => {
                problems.push(Problem::new(
                    field,
                    format!(
                        "is {} bytes; at most {} bytes are allowed (pass large inputs as files the script fetches)",
                        text.len(),
                        policy.max_script_bytes
                    ),
                ));
                String::new()
            }
            Some(text) => text.clone(),
        };

        if self.env.len() + self.secret_env.len() > policy.max_env {
            problems.push(Problem::new(
                "env",
                format!(
                    "has {} variables (with secret_env); at most {} are allowed",
                    self.env.len() + self.secret_env.len(),
                    policy.max_env
                ),
            ));
        }
        validate_secret_env(self, policy, &mut problems);
        let env_bytes: usize = self.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if env_bytes > policy.max_env_bytes {
            problems.push(Problem::new(
                "env",
                format!(
                    "is {env_bytes} bytes; at most {} are allowed",
                    policy.max_env_bytes
                ),
            ));
        }
        for name in self.env.keys() {
            if !is_env_name(name) {
                problems.push(Problem::new(
                    format!("env.{}", name.escape_debug()),
                    "must start with a letter or _ and hold only letters, digits and _",
                ));
            } else if name.starts_with("TASKPODS_") {
                problems.push(Problem::new(
                    format!("env.{name}"),
                    "the TASKPODS_ prefix is reserved for the engine",
                ));
            }
        }

        let timeout_secs = match self.timeout_secs {
            None => policy.default_timeout_secs.min(MAX_TIMEOUT_SECS),
            Some(0) => {
                problems.push(Problem::new("timeout_secs", "must be at least 1 second"));
                0
            }
            Some(t) if t > MAX_TIMEOUT_SECS => {
                problems.push(Problem::new(
                    "timeout_secs",
                    format!("is {t}; at most {MAX_TIMEOUT_SECS} seconds (30 minutes) are allowed"),
                ));
                0
            }
            Some(t) => t,
        };

        let resources = resolve_resources(&self.resources, policy, &mut problems);

        if self.labels.len() > policy.max_labels {
            problems.push(Problem::new(
                "labels",
                format!(
                    "has {} labels; at most {} are allowed",
                    self.labels.len(),
                    policy.max_labels
                ),
            ));
        }
        for (key, value) in &self.labels {
            if !is_label_part(key) {
                problems.push(Problem::new(
                    format!("labels.{}", key.escape_debug()),
                    "key must be 1 to 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
                ));
            }
            if !value.is_empty() && !is_label_part(value) {
                problems.push(Problem::new(
                    format!("labels.{}", key.escape_debug()),
                    "value must be empty or 1 to 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
                ));
            }
        }
        if let Some(requester) = &self.requester
            && requester.len() > 256
        {
            problems.push(Problem::new("requester", "must be at most 256 bytes"));
        }
        let inputs = crate::files::validate_inputs(&self.inputs, &policy.files, &mut problems);

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(TaskSpec {
            image,
            toolbox,
            mode: self.mode,
            instructions,
            env: self
                .env
                .iter()
                .map(|(name, value)| (name.clone(), EnvValue::Clear(value.clone())))
                .collect(),
            secret_env: self.secret_env.clone(),
            timeout_secs,
            resources,
            labels: self.labels.clone(),
            requester: self.requester.clone(),
            idempotency_key: self.idempotency_key.clone(),
            inputs,
            files: policy.files,
        })
    }
}

/// No control character at all.
const NO_CONTROLS: &[char] = &[];
/// Tab and newline only: what scripts, goals and multi-line values (keys, certificates) need.
const TAB_AND_NEWLINE: &[char] = &['\t', '\n'];

/// A problem on `field` when `text` holds a control character (C0, DEL, C1, or a Unicode line or
/// paragraph separator) that `allowed` does not permit; it names the first one and where it is.
fn control_problem(field: &str, text: &str, allowed: &[char]) -> Option<Problem> {
    let (at, c) = text.char_indices().find(|&(_, c)| {
        (c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')) && !allowed.contains(&c)
    })?;
    let what = if c == '\0' {
        "a NUL byte".to_owned()
    } else {
        format!("the control character {}", c.escape_unicode())
    };
    let permitted = if allowed.is_empty() {
        "no control characters are allowed here"
    } else {
        "only tab and newline are allowed among control characters"
    };
    Some(Problem::new(
        field,
        format!("contains {what} at byte {at}; {permitted}"),
    ))
}

fn known(policy: &LaunchPolicy) -> String {
    policy
        .toolboxes
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn resolve_resources(
    asked: &ResourceRequest,
    policy: &LaunchPolicy,
    problems: &mut Vec<Problem>,
) -> Resources {
    let mut quantity = |field: &str,
                        value: &Option<String>,
                        parse: fn(&str) -> Option<u64>,
                        default: u64,
                        cap: u64,
                        unit: &str| {
        let path = format!("resources.{field}");
        match value {
            None => default.min(cap),
            Some(text) => match parse(text) {
                None => {
                    problems.push(Problem::new(
                        path,
                        format!("{text:?} is not a {unit} quantity (e.g. {})", example(unit)),
                    ));
                    0
                }
                Some(0) => {
                    problems.push(Problem::new(path, "must be greater than zero"));
                    0
                }
                Some(v) if v > cap => {
                    problems.push(Problem::new(
                        path,
                        format!("{text} is above the cap of {}", show(unit, cap)),
                    ));
                    0
                }
                Some(v) => v,
            },
        }
    };
    let cpu_limit = quantity(
        "cpu_limit",
        &asked.cpu_limit,
        parse_cpu_millis,
        policy.default_cpu_millis,
        policy.max_cpu_millis,
        "cpu",
    );
    let cpu_request = quantity(
        "cpu_request",
        &asked.cpu_request,
        parse_cpu_millis,
        cpu_limit,
        policy.max_cpu_millis,
        "cpu",
    );
    let memory_limit = quantity(
        "memory_limit",
        &asked.memory_limit,
        parse_memory_bytes,
        policy.default_memory_bytes,
        policy.max_memory_bytes,
        "memory",
    );
    let memory_request = quantity(
        "memory_request",
        &asked.memory_request,
        parse_memory_bytes,
        memory_limit,
        policy.max_memory_bytes,
        "memory",
    );
    if cpu_request > cpu_limit && cpu_limit > 0 {
        problems.push(Problem::new(
            "resources.cpu_request",
            "must not be above cpu_limit",
        ));
    }
    if memory_request > memory_limit && memory_limit > 0 {
        problems.push(Problem::new(
            "resources.memory_request",
            "must not be above memory_limit",
        ));
    }
    Resources {
        cpu_request_millis: cpu_request,
        cpu_limit_millis: cpu_limit,
        memory_request_bytes: memory_request,
        memory_limit_bytes: memory_limit,
    }
}

fn example(unit: &str) -> &'static str {
    if unit == "cpu" {
        "\"500m\" or \"1\""
    } else {
        "\"512Mi\" or \"1Gi\""
    }
}

fn show(unit: &str, value: u64) -> String {
    if unit == "cpu" {
        format!("{value}m")
    } else {
        format!("{}Mi", value / MIB)
    }
}

/// Parses a Kubernetes CPU quantity (`"250m"`, `"1"`, `"0.5"`) into millicores.
pub fn parse_cpu_millis(text: &str) -> Option<u64> {
    if let Some(millis) = text.strip_suffix('m') {
        return millis.parse().ok();
    }
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if frac.len() > 3 || (whole.is_empty() && frac.is_empty()) {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let frac_millis: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().ok()?
    };
    whole.checked_mul(1000)?.checked_add(frac_millis)
}

/// Parses a Kubernetes memory quantity (`"512Mi"`, `"1G"`, `"1048576"`) into bytes.
pub fn parse_memory_bytes(text: &str) -> Option<u64> {
    const SUFFIXES: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (digits, factor) = SUFFIXES
        .iter()
        .find_map(|(suffix, factor)| text.strip_suffix(suffix).map(|d| (d, *factor)))
        .unwrap_or((text, 1));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(factor)
}

/// `secret_env`: allowed by the backend, names valid and distinct from `env`, references well formed.
fn validate_secret_env(launch: &LaunchTask, policy: &LaunchPolicy, problems: &mut Vec<Problem>) {
    if launch.secret_env.is_empty() {
        return;
    }
    if !policy.allow_secret_env {
        problems.push(Problem::new(
            "secret_env",
            "values from Kubernetes Secrets need the Kubernetes backend; this engine runs tasks on \
             another backend (pass the values in env)",
        ));
        return;
    }
    for (name, reference) in &launch.secret_env {
        let field = format!("secret_env.{}", name.escape_debug());
        if !is_env_name(name) {
            problems.push(Problem::new(
                field.clone(),
                "must start with a letter or _ and hold only letters, digits and _",
            ));
        } else if name.starts_with("TASKPODS_") {
            problems.push(Problem::new(
                field.clone(),
                "the TASKPODS_ prefix is reserved for the engine",
            ));
        } else if launch.env.contains_key(name) {
            problems.push(Problem::new(
                field.clone(),
                "is also in env; give each variable one source",
            ));
        }
        if !is_dns_subdomain(&reference.name) {
            problems.push(Problem::new(
                format!("{field}.name"),
                "must be a Secret name: 1 to 253 lowercase letters, digits, '-' and '.', starting and \
                 ending with a letter or digit",
            ));
        }
        if !is_secret_key(&reference.key) {
            problems.push(Problem::new(
                format!("{field}.key"),
                "must be a Secret key: 1 to 253 letters, digits, '-', '_' and '.', not '.' or '..'",
            ));
        }
    }
}

/// A DNS-1123 subdomain, as Kubernetes object names (Secrets among them) must be.
fn is_dns_subdomain(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && text.split('.').all(|label| {
            let l = label.as_bytes();
            !l.is_empty()
                && l[0].is_ascii_alphanumeric()
                && l[l.len() - 1].is_ascii_alphanumeric()
                && l.iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        })
}

/// A Secret data key: what the API server accepts (`[-._a-zA-Z0-9]+`, not `.` or `..`).
fn is_secret_key(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text != "."
        && text != ".."
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_label_part(text: &str) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_launch_gets_every_default_within_the_caps() {
        let policy = LaunchPolicy::default();
        let spec = LaunchTask::script("echo hi")
            .validate(&policy)
            .expect("valid");
        assert_eq!(spec.image, policy.toolboxes["default"]);
        assert_eq!(spec.toolbox.as_deref(), Some("default"));
        assert_eq!(spec.timeout_secs, 1800);
        assert_eq!(spec.instructions, "echo hi");
        assert_eq!(
            spec.resources,
            Resources {
                cpu_request_millis: 500,
                cpu_limit_millis: 500,
                memory_request_bytes: 512 * MIB,
                memory_limit_bytes: 512 * MIB,
            }
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let policy = LaunchPolicy::default();
        let launch = LaunchTask {
            toolbox: Some("gpu-magic".into()),
            script: Some("x".repeat(policy.max_script_bytes + 1)),
            goal: Some("also a goal".into()),
            timeout_secs: Some(1801),
            env: BTreeMap::from([
                ("1BAD".into(), "v".into()),
                ("TASKPODS_TASK_ID".into(), "forged".into()),
            ]),
            resources: ResourceRequest {
                cpu_limit: Some("3".into()),
                memory_limit: Some("lots".into()),
                memory_request: Some("0".into()),
                ..ResourceRequest::default()
            },
            labels: BTreeMap::from([("-bad".into(), "ok".into())]),
            ..LaunchTask::default()
        };
        let problems = launch.validate(&policy).expect_err("invalid");
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "toolbox",
                "goal",
                "script",
                "env.1BAD",
                "env.TASKPODS_TASK_ID",
                "timeout_secs",
                "resources.cpu_limit",
                "resources.memory_limit",
                "resources.memory_request",
                "labels.-bad",
            ]
        );
        assert!(
            problems[0]
                .message
                .contains("unknown toolbox \"gpu-magic\"; known: default")
        );
        assert!(problems[2].message.contains("262145 bytes; at most 262144"));
        assert!(problems[5].message.contains("at most 1800 seconds"));
        assert!(problems[6].message.contains("above the cap of 2000m"));
        assert!(problems[7].message.contains("not a memory quantity"));
    }

    #[test]
    fn control_characters_are_refused_with_the_field_where_they_reach_a_process() {
        let policy = LaunchPolicy::default();
        let launch = LaunchTask {
            idempotency_key: Some("key\n2".into()),
            script: Some("echo a\u{0}--share-net".into()),
            env: BTreeMap::from([
                ("X".into(), "y\u{0}--share-net".into()),
                ("PEM".into(), "-----BEGIN-----\n\tabc\n".into()),
                ("ESC".into(), "\u{1b}[2J".into()),
            ]),
            requester: Some("me\r".into()),
            ..LaunchTask::default()
        };
        let problems = launch.validate(&policy).expect_err("invalid");
        let found: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.field.as_str(), p.message.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "idempotency_key",
                    "contains the control character \\u{a} at byte 3; no control characters are allowed here"
                ),
                (
                    "script",
                    "contains a NUL byte at byte 6; only tab and newline are allowed among control characters"
                ),
                (
                    "requester",
                    "contains the control character \\u{d} at byte 2; no control characters are allowed here"
                ),
                (
                    "env.ESC",
                    "contains the control character \\u{1b} at byte 0; only tab and newline are allowed among control characters"
                ),
                (
                    "env.X",
                    "contains a NUL byte at byte 1; only tab and newline are allowed among control characters"
                ),
            ]
        );
        // Tabs and newlines are what scripts and multi-line values are made of.
        let fine = LaunchTask {
            env: BTreeMap::from([("PEM".into(), "a\n\tb\n".into())]),
            ..LaunchTask::script("for i in 1 2; do\n\techo $i\ndone\n")
        };
        assert!(fine.validate(&policy).is_ok());
        let windows = LaunchTask::script("echo hi\r\n");
        assert_eq!(
            windows
                .validate(&policy)
                .expect_err("CR")
                .first()
                .map(|p| p.field.as_str()),
            Some("script")
        );
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(parse_cpu_millis("250m"), Some(250));
        assert_eq!(parse_cpu_millis("2"), Some(2000));
        assert_eq!(parse_cpu_millis("0.5"), Some(500));
        assert_eq!(parse_cpu_millis(".25"), Some(250));
        assert_eq!(parse_cpu_millis("0.0001"), None);
        assert_eq!(parse_cpu_millis("one"), None);
        assert_eq!(parse_cpu_millis(""), None);
        assert_eq!(parse_memory_bytes("512Mi"), Some(512 * MIB));
        assert_eq!(parse_memory_bytes("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory_bytes("4096"), Some(4096));
        assert_eq!(parse_memory_bytes("Mi"), None);
        assert_eq!(parse_memory_bytes("-1Mi"), None);
        assert_eq!(parse_memory_bytes("99999999999999Ti"), None);
    }

    #[test]
    fn secret_env_needs_the_kubernetes_backend_and_well_formed_references() {
        use crate::env::SecretKeyRef;
        let reference = |name: &str, key: &str| SecretKeyRef {
            name: name.to_owned(),
            key: key.to_owned(),
        };
        let launch = LaunchTask {
            secret_env: BTreeMap::from([(
                "API_TOKEN".to_owned(),
                reference("brain-token", "token"),
            )]),
            ..LaunchTask::script("true")
        };
        let refused = launch
            .validate(&LaunchPolicy::default())
            .expect_err("local");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].field, "secret_env");
        assert!(
            refused[0].message.contains("Kubernetes backend"),
            "{refused:?}"
        );

        let kubernetes = LaunchPolicy {
            allow_secret_env: true,
            ..LaunchPolicy::default()
        };
        let spec = launch.validate(&kubernetes).expect("valid");
        assert_eq!(
            spec.secret_env["API_TOKEN"],
            reference("brain-token", "token")
        );
        assert!(spec.env.is_empty(), "a reference is not a value");

        let bad = LaunchTask {
            env: BTreeMap::from([("BOTH".to_owned(), "x".to_owned())]),
            secret_env: BTreeMap::from([
                ("BOTH".to_owned(), reference("ok", "k")),
                ("TASKPODS_X".to_owned(), reference("ok", "k")),
                ("1BAD".to_owned(), reference("ok", "k")),
                ("UPPER".to_owned(), reference("Not-DNS", "k")),
                ("DOTS".to_owned(), reference("a..b", "..")),
                ("SLASH".to_owned(), reference("ok", "a/b")),
                ("LONG".to_owned(), reference(&"a".repeat(254), "k")),
            ]),
            ..LaunchTask::script("true")
        };
        let fields: Vec<String> = bad
            .validate(&kubernetes)
            .expect_err("invalid")
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(
            fields,
            [
                "secret_env.1BAD",
                "secret_env.BOTH",
                "secret_env.DOTS.name",
                "secret_env.DOTS.key",
                "secret_env.LONG.name",
                "secret_env.SLASH.key",
                "secret_env.TASKPODS_X",
                "secret_env.UPPER.name",
            ]
        );
        // Only the task namespace: a reference has no namespace to name.
        let foreign: Result<LaunchTask, _> = serde_json::from_value(serde_json::json!({
            "script": "true",
            "secret_env": {"T": {"name": "s", "key": "k", "namespace": "kube-system"}}
        }));
        assert!(foreign.unwrap_err().to_string().contains("namespace"));
    }
}
