//! Sealing env values: the engine encrypts each value of a launch's env before the `accepted` event is
//! written (ChaCha20-Poly1305, the task id and variable name as associated data, so a sealed value
//! cannot be moved to another task or variable), and opens them only to hand a task's instructions to
//! that task's own agent. A keyed digest (HMAC-SHA-256) stays in clear.
//!
//! The key is the installation's `seal.key` (from `taskpods auth init`); an engine started without one
//! uses a random key of its own, so values stay out of the log but tasks accepted before a restart cannot
//! get their env back (their agents are told to stop).

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use data_encoding::{BASE64, HEXLOWER};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use taskpods_events::TaskId;
use taskpods_events::env::{Env, EnvValue, SealedValue};

/// The algorithm name recorded with each sealed value.
pub const ALG: &str = "chacha20poly1305";

/// Errors opening a sealed value.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The value was sealed with another key (or another algorithm), or was tampered with.
    #[error("env value {name} cannot be opened with this engine's seal key")]
    Open {
        /// The variable.
        name: String,
    },
    /// The system's random source failed (for a key or a nonce).
    #[error("no randomness to seal with")]
    Random(#[source] getrandom::Error),
    /// The cipher refused to encrypt (it reports no detail; e.g. a value beyond its length limit).
    #[error("env value {name} could not be sealed")]
    Encrypt {
        /// The variable.
        name: String,
    },
}

/// Seals and opens env values.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    digest_key: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key>)")
    }
}

/// HMAC-SHA-256 of `data` under `key`.
fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The associated data binding a sealed value to its task and variable.
fn binding(task: TaskId, name: &str) -> Vec<u8> {
    format!("taskpods env\0{task}\0{name}").into_bytes()
}

impl Sealer {
    /// A sealer with the installation's 256-bit key; the encryption and digest keys are derived from it.
    pub fn new(key: &[u8; 32]) -> Self {
        let encryption = hmac(key, b"taskpods env encryption");
        Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&encryption)),
            digest_key: hmac(key, b"taskpods env digest"),
        }
    }

    /// A sealer with a random key that lives as long as this process.
    pub fn ephemeral() -> Result<Self, SealError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(SealError::Random)?;
        Ok(Self::new(&key))
    }

    /// The keyed digest of `value` (`hmac-sha256:<hex>`).
    pub fn digest(&self, value: &str) -> String {
        format!(
            "hmac-sha256:{}",
            HEXLOWER.encode(&hmac(&self.digest_key, value.as_bytes()))
        )
    }

    /// Seals `value` of variable `name` for `task`.
    pub fn seal(&self, task: TaskId, name: &str, value: &str) -> Result<SealedValue, SealError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(SealError::Random)?;
        let aad = binding(task, name);
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Encrypt {
                name: name.to_owned(),
            })?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        Ok(SealedValue {
            digest: self.digest(value),
            alg: ALG.to_owned(),
            sealed: BASE64.encode(&sealed),
        })
    }

    /// Opens a value sealed for `task`'s variable `name`.
    pub fn open(&self, task: TaskId, name: &str, value: &SealedValue) -> Result<String, SealError> {
        let fail = || SealError::Open {
            name: name.to_owned(),
        };
        if value.alg != ALG {
            return Err(fail());
        }
        let bytes = BASE64.decode(value.sealed.as_bytes()).map_err(|_| fail())?;
        if bytes.len() < 12 {
            return Err(fail());
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let aad = binding(task, name);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| fail())?;
        String::from_utf8(plain).map_err(|_| fail())
    }

    /// `env` with every value in clear sealed (sealed ones kept as they are).
    pub fn seal_env(&self, task: TaskId, env: &Env) -> Result<Env, SealError> {
        env.iter()
            .map(|(name, value)| {
                let value = match value {
                    EnvValue::Clear(clear) => EnvValue::Sealed(self.seal(task, name, clear)?),
                    sealed => sealed.clone(),
                };
                Ok((name.clone(), value))
            })
            .collect()
    }

    /// `env` in clear, for the task's own agent (values recorded in clear before sealing pass through).
    pub fn open_env(&self, task: TaskId, env: &Env) -> Result<BTreeMap<String, String>, SealError> {
        env.iter()
            .map(|(name, value)| {
                let value = match value {
                    EnvValue::Clear(clear) => clear.clone(),
                    EnvValue::Sealed(sealed) => self.open(task, name, sealed)?,
                };
                Ok((name.clone(), value))
            })
            .collect()
    }
}

/// `env` in clear with `sealer`; without one, only values recorded in clear can be given.
pub fn open_env(
    sealer: Option<&Sealer>,
    task: TaskId,
    env: &Env,
) -> Result<BTreeMap<String, String>, SealError> {
    match sealer {
        Some(sealer) => sealer.open_env(task, env),
        None => env
            .iter()
            .map(|(name, value)| match value {
                EnvValue::Clear(clear) => Ok((name.clone(), clear.clone())),
                EnvValue::Sealed(_) => Err(SealError::Open { name: name.clone() }),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_key_for_their_task_and_name() {
        let sealer = Sealer::new(&[7; 32]);
        let task = TaskId::mint();
        let env: Env = BTreeMap::from([
            ("API_TOKEN".to_owned(), EnvValue::Clear("tok-123".into())),
            ("MODE".to_owned(), EnvValue::Clear("fast".into())),
        ]);
        let sealed = sealer.seal_env(task, &env).expect("seal");
        let encoded = serde_json::to_string(&sealed).expect("json");
        assert!(
            !encoded.contains("tok-123") && !encoded.contains("fast"),
            "{encoded}"
        );
        let EnvValue::Sealed(token) = &sealed["API_TOKEN"] else {
            panic!("not sealed")
        };
        assert_eq!(token.digest, sealer.digest("tok-123"));
        let opened = sealer.open_env(task, &sealed).expect("open");
        assert_eq!(opened["API_TOKEN"], "tok-123");
        assert_eq!(opened["MODE"], "fast");
        // Another task, another variable, another key: refused.
        assert!(sealer.open(TaskId::mint(), "API_TOKEN", token).is_err());
        assert!(sealer.open(task, "MODE", token).is_err());
        assert!(
            Sealer::new(&[8; 32])
                .open(task, "API_TOKEN", token)
                .is_err()
        );
        // Two seals of one value differ (fresh nonce); their digests agree.
        let again = sealer.seal(task, "API_TOKEN", "tok-123").expect("seal");
        assert_ne!(again.sealed, token.sealed);
        assert_eq!(again.digest, token.digest);
    }
}
