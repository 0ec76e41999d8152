//! The authorization material of one installation, as `taskpods auth init` writes it: an operator, the
//! taskpods account (JetStream enabled, one signing key), the system account, credentials for the
//! standing roles, the task signer the engine mints per-task users with, the key the engine seals env
//! values with, and the nats-server configuration that trusts them (memory resolver: the server needs
//! no other store, and per-task users never touch it, since they are signed by a key the account lists).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nkeys::KeyPair;
use serde_json::json;
use taskpods_events::Names;

use crate::jwt::{self, Claims, JwtError};
use crate::roles::Role;
use crate::signer::{DEFAULT_MAX_PAYLOAD, Signer, SignerError};

/// Errors while generating or writing the material.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// Signing a JWT failed.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// Minting a role's credentials failed.
    #[error(transparent)]
    Signer(#[from] SignerError),
    /// The directory already holds material (it would lock out everything that uses it).
    #[error("{0} already holds taskpods auth material; choose another directory or pass --force")]
    Exists(String),
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The system's random source failed.
    #[error("no randomness for the seal key")]
    Random(#[source] getrandom::Error),
}

/// Why a seal key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SealKeyError {
    /// The file could not be read.
    #[error("cannot read the seal key {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not hexadecimal.
    #[error("the seal key {path} is not hex")]
    NotHex {
        /// The file.
        path: String,
        /// Where decoding failed.
        #[source]
        source: data_encoding::DecodeError,
    },
    /// The key is not 32 bytes long.
    #[error("the seal key {path} is {len} bytes, not 32 (64 hex digits)")]
    Length {
        /// The file.
        path: String,
        /// Its length in bytes.
        len: usize,
    },
}

/// The file names inside an auth directory.
pub mod files {
    /// The nats-server configuration fragment (`include` it).
    pub const SERVER_CONFIG: &str = "nats-auth.conf";
    /// The engine's account signing key, for per-task users.
    pub const TASK_SIGNER: &str = "task-signer.nk";
    /// The engine's key for sealing env values in events.
    pub const SEAL_KEY: &str = "seal.key";
    /// The operator's seed (keep offline: it signs accounts).
    pub const OPERATOR_SEED: &str = "operator.nk";
    /// The taskpods account's own seed (keep offline).
    pub const ACCOUNT_SEED: &str = "account.nk";
}

/// The keys of one installation.
#[derive(Debug)]
pub struct Material {
    operator: KeyPair,
    account: KeyPair,
    system: KeyPair,
    signer: Signer,
    seal_key: [u8; 32],
}

/// Account limits: everything unlimited, JetStream enabled (memory and file storage).
fn account_limits(jetstream: bool) -> serde_json::Value {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for key in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[key] = json!(-1);
        }
    }
    limits
}

impl Material {
    /// Fresh keys.
    pub fn generate() -> Result<Self, MaterialError> {
        let account = KeyPair::new_account();
        let mut seal_key = [0u8; 32];
        getrandom::fill(&mut seal_key).map_err(MaterialError::Random)?;
        Ok(Self {
            operator: KeyPair::new_operator(),
            signer: Signer::new(account.public_key(), KeyPair::new_account()),
            account,
            system: KeyPair::new_account(),
            seal_key,
        })
    }

    /// The signer for users of the taskpods account.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The key env values are sealed with.
    pub fn seal_key(&self) -> &[u8; 32] {
        &self.seal_key
    }

    /// The nats-server configuration fragment: operator mode with the two accounts preloaded.
    pub fn server_config(&self) -> Result<String, MaterialError> {
        let operator = jwt::encode(
            &Claims {
                subject: self.operator.public_key(),
                name: "taskpods".into(),
                expires: None,
                nats: json!({
                    "type": "operator", "version": 2,
                    "system_account": self.system.public_key(),
                }),
            },
            &self.operator,
        )?;
        let account = jwt::encode(
            &Claims {
                subject: self.account.public_key(),
                name: "TASKPODS".into(),
                expires: None,
                nats: json!({
                    "type": "account", "version": 2,
                    "limits": account_limits(true),
                    "signing_keys": [self.signer.signing_key()],
                    "default_permissions": {"pub": {}, "sub": {}},
                }),
            },
            &self.operator,
        )?;
        let system = jwt::encode(
            &Claims {
                subject: self.system.public_key(),
                name: "SYS".into(),
                expires: None,
                nats: json!({
                    "type": "account", "version": 2,
                    "limits": account_limits(false),
                    "default_permissions": {"pub": {}, "sub": {}},
                }),
            },
            &self.operator,
        )?;
        Ok(format!(
            "# taskpods NATS authorization (written by `taskpods auth init`): operator mode, every user\n\
             # signed by the taskpods account's signing key. Include it in the server configuration.\n\
             operator: {operator}\n\
             system_account: {sys}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {acct}: {account}\n  {sys}: {system}\n}}\n",
            sys = self.system.public_key(),
            acct = self.account.public_key(),
        ))
    }

    /// Writes everything into `dir` (created with mode 0700; every file 0600). Refuses a directory that
    /// already holds material unless `force`. Returns the files written.
    pub fn write(
        &self,
        dir: &Path,
        names: &Names,
        force: bool,
    ) -> Result<Vec<PathBuf>, MaterialError> {
        let config = dir.join(files::SERVER_CONFIG);
        if config.exists() && !force {
            return Err(MaterialError::Exists(dir.display().to_string()));
        }
        let failed = |path: &Path| {
            let path = path.display().to_string();
            move |source| MaterialError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(failed(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(failed(dir))?;
        let seed = |key: &KeyPair| {
            key.seed()
                .map(|s| format!("{s}\n"))
                .map_err(|e| JwtError::Sign(e.to_string()))
        };
        let mut contents = vec![
            (files::SERVER_CONFIG.to_owned(), self.server_config()?),
            (files::TASK_SIGNER.to_owned(), self.signer.to_file()?),
            (
                files::SEAL_KEY.to_owned(),
                format!("{}\n", data_encoding::HEXLOWER.encode(&self.seal_key)),
            ),
            (files::OPERATOR_SEED.to_owned(), seed(&self.operator)?),
            (files::ACCOUNT_SEED.to_owned(), seed(&self.account)?),
        ];
        for role in Role::STANDING {
            let creds = self.signer.mint(role, names, DEFAULT_MAX_PAYLOAD, None)?;
            contents.push((format!("{}.creds", role.name()), creds.to_file()));
        }
        let mut written = Vec::new();
        for (name, text) in contents {
            let path = dir.join(name);
            write_private(&path, &text).map_err(failed(&path))?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Writes `text` to `path` readable by its owner only, replacing any file there.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads a seal key file (64 hex digits).
pub fn read_seal_key(path: &Path) -> Result<[u8; 32], SealKeyError> {
    let shown = || path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SealKeyError::Read {
        path: shown(),
        source,
    })?;
    let bytes = data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.trim().as_bytes())
        .map_err(|source| SealKeyError::NotHex {
            path: shown(),
            source,
        })?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| SealKeyError::Length { path: shown(), len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds::Credentials;

    #[test]
    fn init_writes_private_files_and_a_server_config_that_trusts_the_signer() {
        let dir = tempfile::tempdir().expect("tmp");
        let target = dir.path().join("auth");
        let names = Names::new("taskpods").expect("prefix");
        let material = Material::generate().expect("generate");
        let written = material.write(&target, &names, false).expect("write");
        assert_eq!(written.len(), 9);
        for path in &written {
            let mode = std::fs::metadata(path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
        let config = std::fs::read_to_string(target.join(files::SERVER_CONFIG)).expect("config");
        assert!(config.contains("resolver: MEMORY"));
        let account_jwt = config
            .lines()
            .find(|l| l.trim_start().starts_with(&material.account.public_key()))
            .and_then(|l| l.split(": ").nth(1))
            .expect("account line");
        let account = jwt::claims(account_jwt).expect("claims");
        assert_eq!(account["iss"], material.operator.public_key());
        assert_eq!(
            account["nats"]["signing_keys"][0],
            material.signer.signing_key()
        );
        assert_eq!(account["nats"]["limits"]["disk_storage"], -1);

        let engine = std::fs::read_to_string(target.join("engine.creds")).expect("creds");
        let engine = Credentials::parse(&engine).expect("parse");
        let claims = jwt::claims(&engine.jwt).expect("claims");
        assert_eq!(claims["iss"], material.signer.signing_key());
        assert_eq!(
            claims["nats"]["issuer_account"],
            material.account.public_key()
        );
        assert!(claims.get("exp").is_none());
        assert_eq!(
            read_seal_key(&target.join(files::SEAL_KEY)).expect("seal key"),
            *material.seal_key()
        );
        assert!(matches!(
            Material::generate()
                .expect("gen")
                .write(&target, &names, false),
            Err(MaterialError::Exists(_))
        ));
    }

    #[test]
    fn a_bad_seal_key_says_why_and_keeps_the_cause() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().expect("dir");
        let missing = read_seal_key(&dir.path().join("none")).expect_err("missing");
        assert!(matches!(missing, SealKeyError::Read { .. }));
        assert!(missing.source().is_some());
        let not_hex = dir.path().join("not-hex");
        std::fs::write(&not_hex, "zz").expect("write");
        let error = read_seal_key(&not_hex).expect_err("not hex");
        assert!(matches!(error, SealKeyError::NotHex { .. }) && error.source().is_some());
        let short = dir.path().join("short");
        std::fs::write(&short, "00ff").expect("write");
        assert_eq!(
            read_seal_key(&short).expect_err("short").to_string(),
            format!(
                "the seal key {} is 2 bytes, not 32 (64 hex digits)",
                short.display()
            )
        );
    }
}
