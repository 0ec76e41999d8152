//! Credentials files, the format the `nats` CLI, nats.rs and every NATS client read: the user JWT and the
//! user's nkey seed between marker lines.

use nkeys::KeyPair;

/// Errors while reading a credentials file.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    /// A marker block is missing.
    #[error("credentials have no {0} block")]
    Missing(&'static str),
    /// The seed is not a user nkey seed.
    #[error("credentials hold an invalid user seed: {0}")]
    BadSeed(String),
}

/// A user JWT and the seed that proves its identity.
#[derive(Clone)]
pub struct Credentials {
    /// The signed user JWT.
    pub jwt: String,
    /// The user's nkey seed (`SU...`), secret.
    pub seed: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("jwt", &self.jwt)
            .field("seed", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The credentials file text.
    pub fn to_file(&self) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n",
            self.jwt, self.seed
        )
    }

    /// Reads a credentials file's text.
    pub fn parse(text: &str) -> Result<Self, CredsError> {
        let jwt = block(text, "NATS USER JWT").ok_or(CredsError::Missing("user JWT"))?;
        let seed = block(text, "USER NKEY SEED").ok_or(CredsError::Missing("user seed"))?;
        KeyPair::from_seed(&seed).map_err(|e| CredsError::BadSeed(e.to_string()))?;
        Ok(Self { jwt, seed })
    }
}

/// The first non-empty line after the `BEGIN <what>` marker.
fn block(text: &str, what: &str) -> Option<String> {
    let begin = format!("BEGIN {what}");
    let mut lines = text.lines();
    lines.find(|line| line.contains(&begin))?;
    lines
        .map(str::trim)
        .find(|line| !line.is_empty())
        .filter(|line| !line.starts_with("---"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_through_the_file_format() {
        let user = KeyPair::new_user();
        let creds = Credentials {
            jwt: "header.claims.signature".into(),
            seed: user.seed().expect("seed"),
        };
        let text = creds.to_file();
        assert!(text.starts_with("-----BEGIN NATS USER JWT-----\nheader.claims.signature\n"));
        let back = Credentials::parse(&text).expect("parse");
        assert_eq!(back.jwt, creds.jwt);
        assert_eq!(back.seed, creds.seed);
        assert!(!format!("{back:?}").contains(&creds.seed));
        assert!(matches!(
            Credentials::parse("nothing"),
            Err(CredsError::Missing("user JWT"))
        ));
        let bad = text.replace(&creds.seed, "SUNOTASEED");
        assert!(matches!(
            Credentials::parse(&bad),
            Err(CredsError::BadSeed(_))
        ));
    }
}
