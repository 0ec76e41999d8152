//! NATS JWTs (version 2) as nats-server verifies them: a `{"typ":"JWT","alg":"ed25519-nkey"}` header,
//! JSON claims, each part base64url without padding, signed with the issuer's nkey (ed25519) over
//! `header.claims`. The claim id (`jti`) is the base32 SHA-512/256 of the claims with an empty id, as the
//! reference implementation computes it (servers do not check it, but tools display it).

use chrono::{DateTime, Utc};
use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde_json::{Value, json};
use sha2::{Digest, Sha512_256};

/// Errors while signing or reading a JWT.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The issuer's key could not sign (a public-only key).
    #[error("cannot sign the JWT: {0}")]
    Sign(String),
    /// The token is not three base64url parts holding JSON.
    #[error("not a NATS JWT: {0}")]
    Malformed(&'static str),
    /// The claims are not JSON.
    #[error("JWT claims are not JSON")]
    Json(#[source] serde_json::Error),
}

/// What a JWT says, before the issuer and ids are filled in.
#[derive(Debug, Clone)]
pub struct Claims {
    /// The public key the JWT is about (`sub`).
    pub subject: String,
    /// A human-readable name (`name`).
    pub name: String,
    /// When the JWT stops being accepted (`exp`); never when `None`.
    pub expires: Option<DateTime<Utc>>,
    /// The NATS-specific part (`nats`: type, version, permissions, limits...).
    pub nats: Value,
}

/// Signs `claims` with `issuer` (the issuer becomes `iss`), issued now.
pub fn encode(claims: &Claims, issuer: &KeyPair) -> Result<String, JwtError> {
    encode_at(claims, issuer, Utc::now())
}

/// Signs `claims` with `issuer` as issued at `now`.
pub fn encode_at(
    claims: &Claims,
    issuer: &KeyPair,
    now: DateTime<Utc>,
) -> Result<String, JwtError> {
    let mut body = json!({
        "jti": "",
        "iat": now.timestamp(),
        "iss": issuer.public_key(),
        "name": claims.name,
        "sub": claims.subject,
    });
    if let Some(expires) = claims.expires {
        body["exp"] = json!(expires.timestamp());
    }
    let id = BASE32_NOPAD.encode(&Sha512_256::digest(body.to_string().as_bytes()));
    body["jti"] = json!(id);
    body["nats"] = claims.nats.clone();
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let payload = BASE64URL_NOPAD.encode(body.to_string().as_bytes());
    let signed = format!("{header}.{payload}");
    let signature = issuer
        .sign(signed.as_bytes())
        .map_err(|e| JwtError::Sign(e.to_string()))?;
    Ok(format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature)))
}

/// The claims of `token`, without checking the signature (for display and tests).
pub fn claims(token: &str) -> Result<Value, JwtError> {
    let mut parts = token.trim().split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    let bytes = BASE64URL_NOPAD
        .decode(payload.as_bytes())
        .map_err(|_| JwtError::Malformed("claims are not base64url"))?;
    serde_json::from_slice(&bytes).map_err(JwtError::Json)
}

/// Whether `token` carries a valid signature by the key named in its `iss`.
pub fn signature_valid(token: &str) -> bool {
    let Some((signed, signature)) = token.trim().rsplit_once('.') else {
        return false;
    };
    let Ok(signature) = BASE64URL_NOPAD.decode(signature.as_bytes()) else {
        return false;
    };
    let Some(issuer) = claims(token)
        .ok()
        .and_then(|c| c["iss"].as_str().map(str::to_owned))
    else {
        return false;
    };
    KeyPair::from_public_key(&issuer)
        .and_then(|key| key.verify(signed.as_bytes(), &signature))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_jwt_carries_the_claims_and_verifies_against_its_issuer() {
        let issuer = KeyPair::new_account();
        let user = KeyPair::new_user();
        let expires = Utc::now() + chrono::TimeDelta::minutes(5);
        let token = encode(
            &Claims {
                subject: user.public_key(),
                name: "t".into(),
                expires: Some(expires),
                nats: json!({"type": "user", "version": 2}),
            },
            &issuer,
        )
        .expect("sign");
        let body = claims(&token).expect("claims");
        assert_eq!(body["iss"], issuer.public_key());
        assert_eq!(body["sub"], user.public_key());
        assert_eq!(body["exp"], expires.timestamp());
        assert_eq!(body["nats"]["type"], "user");
        assert_eq!(body["jti"].as_str().map(str::len), Some(52));
        assert!(signature_valid(&token));
        // Any change to the claims breaks the signature.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut forged = body.clone();
        forged["nats"]["type"] = json!("operator");
        parts[1] = BASE64URL_NOPAD.encode(forged.to_string().as_bytes());
        assert!(!signature_valid(&parts.join(".")));
        assert!(matches!(claims("a.b"), Err(JwtError::Malformed(_))));
    }
}
