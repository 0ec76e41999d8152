//! Env values as the event log records them. The engine seals each value when it accepts a launch: the
//! value is encrypted (only the engine, holding the seal key, can read it back, and only to hand it to
//! the task's own agent), and a keyed digest stays in clear so a caller who knows the value can be told
//! whether two launches used the same one. Events recorded before sealing hold the value in clear and
//! still decode. `Debug` never shows a value.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One env value in a [`crate::TaskSpec`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum EnvValue {
    /// Encrypted by the engine.
    Sealed(SealedValue),
    /// In clear: a launch not yet sealed (in memory), or an event recorded before sealing.
    Clear(String),
}

/// A value encrypted with the engine's seal key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SealedValue {
    /// `hmac-sha256:<hex>` of the value, keyed with a key derived from the seal key.
    pub digest: String,
    /// The algorithm and key version (`chacha20poly1305`).
    pub alg: String,
    /// Nonce and ciphertext, base64.
    pub sealed: String,
}

impl fmt::Debug for EnvValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sealed(sealed) => sealed.fmt(f),
            Self::Clear(_) => f.write_str("<redacted>"),
        }
    }
}

impl fmt::Debug for SealedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<sealed {}>", self.digest)
    }
}

impl From<String> for EnvValue {
    fn from(value: String) -> Self {
        Self::Clear(value)
    }
}

impl From<&str> for EnvValue {
    fn from(value: &str) -> Self {
        Self::Clear(value.to_owned())
    }
}

impl EnvValue {
    /// Whether the value is stored in clear.
    pub fn is_clear(&self) -> bool {
        matches!(self, Self::Clear(_))
    }
}

/// A task's env as recorded.
pub type Env = BTreeMap<String, EnvValue>;

/// An env value taken from one key of a Kubernetes Secret in the task namespace (the Kubernetes backend
/// only). The task pod's container gets it through `valueFrom.secretKeyRef`; the engine never reads the
/// Secret, so the value is in no event, view or log. There is no namespace: only the task namespace's
/// Secrets can be named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret's name (a DNS subdomain: lowercase letters, digits, `-` and `.`, at most 253).
    pub name: String,
    /// The key in the Secret (letters, digits, `-`, `_` and `.`, at most 253).
    pub key: String,
}

/// Env variables whose values come from Kubernetes Secrets, by name.
pub type SecretEnv = BTreeMap<String, SecretKeyRef>;

/// In a task pod, the agent's variable listing the names of the Secret-backed variables (comma-separated).
pub const SECRET_ENV_NAMES_VAR: &str = "TASKPODS_SECRET_ENV";
/// In a task pod, the prefix of the agent's variables holding Secret-backed values
/// (`TASKPODS_SECRET_ENV_<NAME>`); the agent hands each to the code as `<NAME>`. The prefix keeps a
/// Secret's value from changing the agent's own environment (`PATH`, `LD_PRELOAD`, `TASKPODS_*`).
pub const SECRET_ENV_VALUE_PREFIX: &str = "TASKPODS_SECRET_ENV_";

/// Writes env values as `NAME=<redacted>` for `Debug` impls of types that carry them in clear.
pub struct Redacted<'a, V>(pub &'a BTreeMap<String, V>);

impl<V> fmt::Debug for Redacted<'_, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_and_sealed_values_decode_and_debug_never_shows_a_value() {
        let clear: Env = rmp_serde::from_slice(
            &rmp_serde::to_vec_named(&BTreeMap::from([("TOKEN", "s3cret")])).expect("encode"),
        )
        .expect("a v1 env decodes");
        assert_eq!(clear["TOKEN"], EnvValue::Clear("s3cret".into()));
        let sealed = EnvValue::Sealed(SealedValue {
            digest: "hmac-sha256:ab".into(),
            alg: "chacha20poly1305".into(),
            sealed: "AAAA".into(),
        });
        let env: Env = BTreeMap::from([("TOKEN".to_owned(), sealed.clone())]);
        let back: Env =
            rmp_serde::from_slice(&rmp_serde::to_vec_named(&env).expect("encode")).expect("decode");
        assert_eq!(back["TOKEN"], sealed);
        let json: Env =
            serde_json::from_str(&serde_json::to_string(&env).expect("json")).expect("json");
        assert_eq!(json["TOKEN"], sealed);
        let shown = format!("{clear:?} {env:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("AAAA"),
            "{shown}"
        );
        assert!(shown.contains("hmac-sha256:ab"), "{shown}");
        let plain = BTreeMap::from([("A".to_owned(), "s3cret".to_owned())]);
        assert_eq!(format!("{:?}", Redacted(&plain)), r#"{"A": "<redacted>"}"#);
    }
}
