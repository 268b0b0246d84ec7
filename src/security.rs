//! Client credentials: resume tokens (HMAC-SHA256 of the client id under the deployment's resume
//! secret), client JWTs (HS256), and the server API key. Secrets that are not configured are
//! generated once and kept in the data dir, so tokens survive restarts.

use crate::address::ClientId;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

type HmacSha256 = Hmac<Sha256>;

/// Why a credential was refused. The text is what the client sees in `connect_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a client token is required (auth.token)")]
    TokenMissing,
    #[error("invalid client token: {0}")]
    TokenInvalid(String),
    #[error("invalid resume token for this clientId")]
    ResumeRefused,
    #[error("resumeToken given without clientId")]
    ResumeWithoutClient,
    #[error("{0}")]
    BadAuth(String),
}

/// Checks and issues client credentials.
pub struct Credentials {
    resume_key: Vec<u8>,
    jwt: Option<(jsonwebtoken::DecodingKey, jsonwebtoken::Validation)>,
    require_token: bool,
}

/// The claims signalpost reads from a client JWT.
#[derive(Debug, serde::Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
}

impl Credentials {
    pub fn new(
        resume_secret: &[u8],
        client_token_secret: Option<&str>,
        require_token: bool,
    ) -> Self {
        let jwt = client_token_secret.map(|s| {
            let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
            v.set_required_spec_claims(&["exp", "sub"]);
            v.leeway = 5;
            (jsonwebtoken::DecodingKey::from_secret(s.as_bytes()), v)
        });
        Self {
            resume_key: resume_secret.to_vec(),
            jwt,
            require_token,
        }
    }

    /// The resume token of a client id.
    pub fn resume_token(&self, client: &ClientId) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(client).finalize().into_bytes())
    }

    /// Checks a resume token in constant time.
    pub fn check_resume(&self, client: &ClientId, token: &str) -> Result<(), AuthError> {
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| AuthError::ResumeRefused)?;
        self.mac(client)
            .verify_slice(&raw)
            .map_err(|_| AuthError::ResumeRefused)
    }

    fn mac(&self, client: &ClientId) -> HmacSha256 {
        let mut m =
            HmacSha256::new_from_slice(&self.resume_key).expect("HMAC takes any key length");
        m.update(b"signalpost-resume:");
        m.update(client.as_str().as_bytes());
        m
    }

    /// Checks the handshake's JWT; returns the user id when a valid token was given.
    pub fn check_token(&self, token: Option<&str>) -> Result<Option<String>, AuthError> {
        match (token, &self.jwt) {
            (None, _) if self.require_token => Err(AuthError::TokenMissing),
            (None, _) => Ok(None),
            // No secret configured: tokens are not checked (and not trusted for a user id).
            (Some(_), None) => Ok(None),
            (Some(t), Some((key, validation))) => {
                jsonwebtoken::decode::<Claims>(t, key, validation)
                    .map(|d| Some(d.claims.sub))
                    .map_err(|e| AuthError::TokenInvalid(e.to_string()))
            }
        }
    }
}

/// Reads the secret at `dir/name`, or generates 32 random bytes and keeps them there (mode 0600).
pub fn load_or_create_secret(dir: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(s) if s.len() >= 32 => return Ok(s),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} is shorter than 32 bytes",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(std::io::Error::other)?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, hex.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(hex.into_bytes())
}

/// Compares an `Authorization` header with the API key in constant time.
pub fn api_key_matches(header: Option<&str>, key: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &str, sub: &str, exp_offset: i64) -> String {
        #[derive(serde::Serialize)]
        struct C<'a> {
            sub: &'a str,
            exp: i64,
        }
        let exp = (crate::mailbox::now_ms() / 1000) as i64 + exp_offset;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &C { sub, exp },
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn resume_tokens_bind_to_client_and_secret() {
        let c = Credentials::new(b"k1", None, false);
        let (a, b) = (ClientId::parse("a").unwrap(), ClientId::parse("b").unwrap());
        let t = c.resume_token(&a);
        assert!(c.check_resume(&a, &t).is_ok());
        assert_eq!(c.check_resume(&b, &t), Err(AuthError::ResumeRefused));
        assert_eq!(
            c.check_resume(&a, "not base64!"),
            Err(AuthError::ResumeRefused)
        );
        let other = Credentials::new(b"k2", None, false);
        assert!(
            other.check_resume(&a, &t).is_err(),
            "another deployment's token is refused"
        );
    }

    #[test]
    fn jwt_checked_when_configured() {
        let c = Credentials::new(b"k", Some("s3cret"), true);
        assert_eq!(
            c.check_token(Some(&token("s3cret", "u1", 60))),
            Ok(Some("u1".into()))
        );
        assert_eq!(c.check_token(None), Err(AuthError::TokenMissing));
        assert!(matches!(
            c.check_token(Some(&token("wrong", "u1", 60))),
            Err(AuthError::TokenInvalid(_))
        ));
        assert!(matches!(
            c.check_token(Some(&token("s3cret", "u1", -600))),
            Err(AuthError::TokenInvalid(_))
        ));
        assert!(matches!(
            c.check_token(Some("garbage")),
            Err(AuthError::TokenInvalid(_))
        ));
        let open = Credentials::new(b"k", None, false);
        assert_eq!(open.check_token(None), Ok(None));
    }

    #[test]
    fn secret_is_generated_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let s1 = load_or_create_secret(d.path(), "resume.secret").unwrap();
        let s2 = load_or_create_secret(d.path(), "resume.secret").unwrap();
        assert_eq!(s1, s2);
        assert_eq!(s1.len(), 64);
    }

    #[test]
    fn api_key_check() {
        assert!(api_key_matches(Some("Bearer k"), "k"));
        assert!(!api_key_matches(Some("Bearer x"), "k"));
        assert!(!api_key_matches(Some("k"), "k"));
        assert!(!api_key_matches(None, "k"));
    }
}
