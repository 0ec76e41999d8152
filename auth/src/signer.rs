//! Minting user credentials: the account signing key the engine holds signs a fresh user nkey's JWT
//! with a role's permissions, a payload limit and an expiry.

use std::path::Path;

use chrono::{DateTime, Utc};
use nkeys::KeyPair;
use serde_json::json;
use taskpods_events::{Names, TaskId};

use crate::creds::Credentials;
use crate::jwt::{self, Claims, JwtError};
use crate::roles::{Role, permissions};

/// Errors while loading a signer or minting credentials.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The signer file could not be read.
    #[error("cannot read the task signer {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The signer file lacks a line or holds an invalid key.
    #[error("task signer {path}: {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// Signing failed.
    #[error(transparent)]
    Jwt(#[from] JwtError),
}

/// An account signing key and the account it signs for.
#[derive(Clone)]
pub struct Signer {
    account: String,
    key: std::sync::Arc<KeyPair>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("account", &self.account)
            .field("key", &self.key.public_key())
            .finish()
    }
}

/// What a user may send at most in one message, unless the role says otherwise.
pub const DEFAULT_MAX_PAYLOAD: i64 = 1 << 20;

impl Signer {
    /// A signer for `account` (its public key) with the account's signing `key`.
    pub fn new(account: String, key: KeyPair) -> Self {
        Self {
            account,
            key: std::sync::Arc::new(key),
        }
    }

    /// The account users are minted in.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The signing key's public key (listed in the account's `signing_keys`).
    pub fn signing_key(&self) -> String {
        self.key.public_key()
    }

    /// The signer file text (`account: A…` and `seed: SA…` lines).
    pub fn to_file(&self) -> Result<String, SignerError> {
        let seed = self.key.seed().map_err(|e| SignerError::Invalid {
            path: "(in memory)".into(),
            problem: format!("no seed: {e}"),
        })?;
        Ok(format!(
            "# The account signing key taskpods mints per-task NATS users with. Secret: whoever holds it\n\
             # can mint any user of the taskpods account.\n\
             account: {}\nseed: {seed}\n",
            self.account
        ))
    }

    /// Reads a signer file.
    pub fn load(path: &Path) -> Result<Self, SignerError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SignerError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|problem| SignerError::Invalid {
            path: shown,
            problem,
        })
    }

    /// Parses a signer file's text; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let field = |name: &str| {
            text.lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(key, _)| key.trim() == name)
                .map(|(_, value)| value.trim().to_owned())
                .ok_or_else(|| format!("no `{name}:` line"))
        };
        let account = field("account")?;
        if !nkeys::KeyPair::from_public_key(&account)
            .is_ok_and(|k| k.key_pair_type() == nkeys::KeyPairType::Account)
        {
            return Err("`account:` is not an account public key".into());
        }
        let key = KeyPair::from_seed(&field("seed")?)
            .map_err(|e| format!("`seed:` is not an nkey seed: {e}"))?;
        if key.key_pair_type() != nkeys::KeyPairType::Account {
            return Err("`seed:` is not an account signing key".into());
        }
        Ok(Self::new(account, key))
    }

    /// Credentials for a new user with `role`'s permissions, at most `max_payload` bytes a message,
    /// valid until `expires` (forever when `None`).
    pub fn mint(
        &self,
        role: Role,
        names: &Names,
        max_payload: i64,
        expires: Option<DateTime<Utc>>,
    ) -> Result<Credentials, SignerError> {
        let user = KeyPair::new_user();
        let mut nats = permissions(role, names).to_claims();
        nats["subs"] = json!(-1);
        nats["data"] = json!(-1);
        nats["payload"] = json!(max_payload);
        nats["issuer_account"] = json!(self.account);
        nats["type"] = json!("user");
        nats["version"] = json!(2);
        let token = jwt::encode(
            &Claims {
                subject: user.public_key(),
                name: format!("{}-{}", names.prefix(), role.name()),
                expires,
                nats,
            },
            &self.key,
        )?;
        let seed = user.seed().map_err(|e| JwtError::Sign(e.to_string()))?;
        Ok(Credentials { jwt: token, seed })
    }

    /// Credentials for `task`'s agent: its own subjects only, expiring at `expires`.
    pub fn mint_task(
        &self,
        task: TaskId,
        names: &Names,
        max_payload: i64,
        expires: DateTime<Utc>,
    ) -> Result<Credentials, SignerError> {
        self.mint(Role::Task(task), names, max_payload, Some(expires))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_user_is_signed_by_the_signing_key_for_the_account_and_expires() {
        let account = KeyPair::new_account();
        let signing = KeyPair::new_account();
        let signer = Signer::new(account.public_key(), signing);
        let names = Names::new("taskpods").expect("prefix");
        let task = TaskId::mint();
        let expires = Utc::now() + chrono::TimeDelta::minutes(3);
        let creds = signer.mint_task(task, &names, 4096, expires).expect("mint");
        assert!(jwt::signature_valid(&creds.jwt));
        let claims = jwt::claims(&creds.jwt).expect("claims");
        assert_eq!(claims["exp"], expires.timestamp());
        assert_eq!(claims["nats"]["issuer_account"], account.public_key());
        assert_eq!(claims["nats"]["payload"], 4096);
        assert_eq!(
            claims["nats"]["sub"]["allow"],
            json!([format!("_INBOX_{task}.>")])
        );
        let user = KeyPair::from_seed(&creds.seed).expect("seed");
        assert_eq!(claims["sub"], user.public_key());

        let text = signer.to_file().expect("file");
        let back = Signer::parse(&text).expect("parse");
        assert_eq!(back.account(), account.public_key());
        assert!(Signer::parse("account: nope\nseed: x").is_err());
        let user_seed = format!("account: {}\nseed: {}\n", account.public_key(), creds.seed);
        assert_eq!(
            Signer::parse(&user_seed).err().as_deref(),
            Some("`seed:` is not an account signing key")
        );
    }
}
