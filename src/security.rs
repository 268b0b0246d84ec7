//! Client credentials: resume tokens (HMAC-SHA256 of the client id under the deployment's resume
//! secret), client JWTs (HS256), and the server API key. Secrets that are not configured are
//! generated once and kept in the data dir, so tokens survive restarts.

use crate::address::ClientId;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

pub mod jwt;

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
    #[error("resume token expired: connect as a new client")]
    ResumeExpired,
    #[error("this client was revoked: connect as a new client")]
    Revoked,
    #[error("resumeToken given without clientId")]
    ResumeWithoutClient,
    #[error("{0}")]
    BadAuth(String),
}

/// The key client JWTs are checked with.
pub enum TokenKey {
    /// HS256 with a shared secret.
    Secret(String),
    /// RS256 or ES256 with a public key (PEM).
    PublicPem(Vec<u8>),
}

/// Checks and issues client credentials.
pub struct Credentials {
    resume_key: Vec<u8>,
    jwt: Option<(jsonwebtoken::DecodingKey, jsonwebtoken::Validation)>,
    require_token: bool,
    /// How long a resume token is good for (the retention: after it, nothing is left to resume).
    resume_ttl_ms: u64,
}

/// The claims signalpost reads from a client JWT.
#[derive(Debug, serde::Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry (seconds since epoch).
    pub exp: u64,
}

/// A user proven by a valid JWT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    /// When the token expires (ms since epoch): the connection must `refresh` before.
    pub expires_ms: u64,
}

/// The version tag of resume tokens: `v2.<issued, s>.<HMAC>`.
const RESUME_V: &str = "v2";

impl Credentials {
    /// Fails with the reason when the public key cannot be read as RSA or EC.
    pub fn new(
        resume_secret: &[u8],
        key: Option<TokenKey>,
        require_token: bool,
        resume_ttl_ms: u64,
    ) -> Result<Self, String> {
        use jsonwebtoken::{Algorithm, DecodingKey, Validation};
        jwt::install();
        let jwt = match key {
            None => None,
            Some(TokenKey::Secret(s)) => Some((
                DecodingKey::from_secret(s.as_bytes()),
                Validation::new(Algorithm::HS256),
            )),
            #[cfg(feature = "tls")]
            Some(TokenKey::PublicPem(pem)) => Some(
                match (
                    DecodingKey::from_rsa_pem(&pem),
                    DecodingKey::from_ec_pem(&pem),
                ) {
                    (Ok(k), _) => (k, Validation::new(Algorithm::RS256)),
                    (_, Ok(k)) => (k, Validation::new(Algorithm::ES256)),
                    (Err(e), _) => {
                        return Err(format!(
                            "client_token_public_key is neither an RSA nor an EC public key (PEM): {e}"
                        ));
                    }
                },
            ),
            #[cfg(not(feature = "tls"))]
            Some(TokenKey::PublicPem(_)) => {
                return Err(
                    "client_token_public_key (RS256/ES256 tokens) needs a signalpost built with `cargo build --release --features tls`; this one checks HS256 tokens only".into(),
                );
            }
        };
        let jwt = jwt.map(|(k, mut v)| {
            v.set_required_spec_claims(&["exp", "sub"]);
            v.validate_nbf = true;
            v.leeway = 5;
            (k, v)
        });
        Ok(Self {
            resume_key: resume_secret.to_vec(),
            jwt,
            require_token,
            resume_ttl_ms,
        })
    }

    /// The resume token of a client id (and its user, when it connected with a JWT), issued now.
    pub fn resume_token(&self, client: &ClientId, user: Option<&str>, now_ms: u64) -> String {
        let issued = now_ms / 1000;
        let mac = self.mac(client, user, issued).finalize().into_bytes();
        format!("{RESUME_V}.{issued}.{}", URL_SAFE_NO_PAD.encode(mac))
    }

    /// Checks a resume token in constant time: it must be this client's, for the same user (or
    /// none), and not older than the retention. Returns when it was issued (ms since epoch).
    pub fn check_resume(
        &self,
        client: &ClientId,
        user: Option<&str>,
        token: &str,
        now_ms: u64,
    ) -> Result<u64, AuthError> {
        let mut parts = token.splitn(3, '.');
        let (Some(RESUME_V), Some(issued), Some(mac)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::ResumeRefused);
        };
        let issued: u64 = issued.parse().map_err(|_| AuthError::ResumeRefused)?;
        let raw = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| AuthError::ResumeRefused)?;
        self.mac(client, user, issued)
            .verify_slice(&raw)
            .map_err(|_| AuthError::ResumeRefused)?;
        let issued_ms = issued.saturating_mul(1000);
        if now_ms.saturating_sub(issued_ms) > self.resume_ttl_ms {
            return Err(AuthError::ResumeExpired);
        }
        Ok(issued_ms)
    }

    fn mac(&self, client: &ClientId, user: Option<&str>, issued: u64) -> HmacSha256 {
        let mut m =
            HmacSha256::new_from_slice(&self.resume_key).expect("HMAC takes any key length");
        m.update(b"signalpost-resume-v2\n");
        for part in [
            client.as_str().as_bytes(),
            user.unwrap_or("").as_bytes(),
            issued.to_string().as_bytes(),
        ] {
            m.update(&(part.len() as u32).to_be_bytes());
            m.update(part);
        }
        m.update(&[u8::from(user.is_some())]);
        m
    }

    /// Checks the handshake's (or a `refresh`'s) JWT; returns the user when a valid token was
    /// given.
    pub fn check_token(&self, token: Option<&str>) -> Result<Option<User>, AuthError> {
        match (token, &self.jwt) {
            (None, _) if self.require_token => Err(AuthError::TokenMissing),
            (None, _) => Ok(None),
            // No key configured: tokens are not checked (and not trusted for a user id).
            (Some(_), None) => Ok(None),
            (Some(t), Some((key, validation))) => {
                let claims = jsonwebtoken::decode::<Claims>(t, key, validation)
                    .map_err(|e| AuthError::TokenInvalid(e.to_string()))?
                    .claims;
                if claims.sub.is_empty() {
                    return Err(AuthError::TokenInvalid("sub is empty".into()));
                }
                Ok(Some(User {
                    id: claims.sub,
                    expires_ms: claims.exp.saturating_mul(1000),
                }))
            }
        }
    }

    /// Whether client tokens are checked at all (a key is configured).
    pub fn checks_tokens(&self) -> bool {
        self.jwt.is_some()
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

/// How far a node-to-node request's time may be from the receiver's clock.
pub const PEER_CLOCK_SKEW_MS: u64 = 30_000;

/// The headers of a signed node-to-node request.
pub const PEER_NODE: &str = "x-signalpost-node";
pub const PEER_TIME: &str = "x-signalpost-time";
pub const PEER_NONCE: &str = "x-signalpost-nonce";
pub const PEER_SIGNATURE: &str = "x-signalpost-signature";

/// Why a node-to-node request was refused (the caller gets 401 with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAuthError {
    #[error("node-to-node request without {0}")]
    Missing(&'static str),
    #[error(
        "node-to-node request signed {0} ms away from this node's clock (limit {PEER_CLOCK_SKEW_MS} ms)"
    )]
    Skew(i64),
    #[error("node-to-node request with a bad signature")]
    BadSignature,
    #[error("node-to-node request replayed")]
    Replayed,
}

/// Signs and checks node-to-node requests: an HMAC-SHA256 under the shared `cluster_secret`
/// over the method, path, sender, time, a nonce and the body's SHA-256. A receiver refuses a
/// bad signature, a time more than [`PEER_CLOCK_SKEW_MS`] away, and a nonce it has seen within
/// that window (a replay).
pub struct PeerAuth {
    key: Vec<u8>,
    /// Nonces seen, with the time they stop mattering (their request's time + the skew).
    seen: std::sync::Mutex<std::collections::HashMap<[u8; 16], u64>>,
}

/// The headers that sign one request.
pub struct PeerSignature {
    pub node: String,
    pub time: String,
    pub nonce: String,
    pub signature: String,
}

impl PeerAuth {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: secret.to_vec(),
            seen: Default::default(),
        }
    }

    fn mac(
        &self,
        method: &str,
        path: &str,
        node: &str,
        time: u64,
        nonce: &[u8],
        body: &[u8],
    ) -> HmacSha256 {
        use sha2::Digest;
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(b"signalpost-peer-v1\n");
        for part in [
            method.as_bytes(),
            path.as_bytes(),
            node.as_bytes(),
            time.to_string().as_bytes(),
            nonce,
        ] {
            m.update(&(part.len() as u32).to_be_bytes());
            m.update(part);
        }
        m.update(&Sha256::digest(body));
        m
    }

    /// Signs a request of `node` at `now_ms`.
    pub fn sign(
        &self,
        method: &str,
        path: &str,
        node: &str,
        body: &[u8],
        now_ms: u64,
    ) -> PeerSignature {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("the OS gives random bytes");
        let mac = self.mac(method, path, node, now_ms, &nonce, body);
        PeerSignature {
            node: node.to_string(),
            time: now_ms.to_string(),
            nonce: URL_SAFE_NO_PAD.encode(nonce),
            signature: URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()),
        }
    }

    /// Checks a request's signature headers (`header(name)` reads one); returns the sender.
    pub fn verify<'h>(
        &self,
        method: &str,
        path: &str,
        header: impl Fn(&'static str) -> Option<&'h str>,
        body: &[u8],
        now_ms: u64,
    ) -> Result<String, PeerAuthError> {
        let get = |n: &'static str| header(n).ok_or(PeerAuthError::Missing(n));
        let node = get(PEER_NODE)?;
        let time: u64 = get(PEER_TIME)?
            .parse()
            .map_err(|_| PeerAuthError::Missing(PEER_TIME))?;
        let skew = time as i64 - now_ms as i64;
        if skew.unsigned_abs() > PEER_CLOCK_SKEW_MS {
            return Err(PeerAuthError::Skew(skew));
        }
        let nonce: [u8; 16] = URL_SAFE_NO_PAD
            .decode(get(PEER_NONCE)?)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or(PeerAuthError::Missing(PEER_NONCE))?;
        let signature = URL_SAFE_NO_PAD
            .decode(get(PEER_SIGNATURE)?)
            .map_err(|_| PeerAuthError::BadSignature)?;
        self.mac(method, path, node, time, &nonce, body)
            .verify_slice(&signature)
            .map_err(|_| PeerAuthError::BadSignature)?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 100_000 {
            seen.retain(|_, until| *until > now_ms);
        }
        let until = time + PEER_CLOCK_SKEW_MS;
        if seen.insert(nonce, until).is_some_and(|old| old > now_ms) {
            return Err(PeerAuthError::Replayed);
        }
        Ok(node.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &str, sub: &str, exp_offset: i64) -> String {
        token_with(
            secret,
            serde_json::json!({ "sub": sub, "exp": now_s() + exp_offset }),
        )
    }

    fn now_s() -> i64 {
        (crate::clock::now_ms() / 1000) as i64
    }

    fn token_with(secret: &str, claims: serde_json::Value) -> String {
        jwt::install();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    const DAY: u64 = 86_400_000;

    fn creds(resume: &[u8], jwt: Option<&str>, require: bool) -> Credentials {
        Credentials::new(
            resume,
            jwt.map(|s| TokenKey::Secret(s.into())),
            require,
            30 * DAY,
        )
        .unwrap()
    }

    #[test]
    fn resume_tokens_bind_to_client_user_and_secret_and_expire() {
        let c = creds(b"k1", None, false);
        let now = 1_700_000_000_000;
        let (a, b) = (ClientId::parse("a").unwrap(), ClientId::parse("b").unwrap());
        let t = c.resume_token(&a, None, now);
        assert!(c.check_resume(&a, None, &t, now).is_ok());
        assert_eq!(
            c.check_resume(&b, None, &t, now),
            Err(AuthError::ResumeRefused)
        );
        assert_eq!(
            c.check_resume(&a, Some("u"), &t, now),
            Err(AuthError::ResumeRefused),
            "a user's JWT does not resume an anonymous client"
        );
        let tu = c.resume_token(&a, Some("alice"), now);
        assert!(c.check_resume(&a, Some("alice"), &tu, now).is_ok());
        assert_eq!(
            c.check_resume(&a, Some("bob"), &tu, now),
            Err(AuthError::ResumeRefused),
            "bob's JWT does not resume alice's client"
        );
        assert_eq!(
            c.check_resume(&a, None, &tu, now),
            Err(AuthError::ResumeRefused)
        );
        assert_eq!(
            c.check_resume(&a, None, &t, now + 31 * DAY),
            Err(AuthError::ResumeExpired)
        );
        assert_eq!(
            c.check_resume(&a, None, "not a token", now),
            Err(AuthError::ResumeRefused)
        );
        // The issue time is covered by the MAC: it cannot be moved forward.
        let moved = t.replacen(
            &format!(".{}.", now / 1000),
            &format!(".{}.", now / 1000 + 99),
            1,
        );
        assert_eq!(
            c.check_resume(&a, None, &moved, now),
            Err(AuthError::ResumeRefused)
        );
        let other = creds(b"k2", None, false);
        assert!(
            other.check_resume(&a, None, &t, now).is_err(),
            "another deployment's token is refused"
        );
    }

    #[test]
    fn jwt_checked_when_configured() {
        let s = "s3cret-s3cret-s3cret-s3cret-s3cret";
        let c = creds(b"k", Some(s), true);
        let u = c.check_token(Some(&token(s, "u1", 60))).unwrap().unwrap();
        assert_eq!(u.id, "u1");
        assert!(u.expires_ms > crate::clock::now_ms());
        assert_eq!(c.check_token(None), Err(AuthError::TokenMissing));
        let invalid = |t: &str, why: &str| {
            let e = c.check_token(Some(t)).unwrap_err();
            assert!(matches!(e, AuthError::TokenInvalid(_)), "{why}: {e:?}");
            e.to_string()
        };
        invalid(&token("wrong", "u1", 60), "wrong key");
        invalid(&token(s, "u1", -600), "expired");
        invalid("garbage", "garbage");
        let e = invalid(
            &token_with(
                s,
                serde_json::json!({"sub": "u1", "exp": now_s() + 60, "nbf": now_s() + 600}),
            ),
            "not yet valid",
        );
        assert!(
            e.contains("Immature") || e.contains("nbf") || e.contains("immature"),
            "{e}"
        );
        let e = invalid(
            &token_with(s, serde_json::json!({"sub": "", "exp": now_s() + 60})),
            "empty sub",
        );
        assert!(e.contains("sub is empty"), "{e}");
        invalid(
            &token_with(s, serde_json::json!({"exp": now_s() + 60})),
            "no sub",
        );
        let open = creds(b"k", None, false);
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
    fn peer_requests_are_signed_and_replays_refused() {
        let a = PeerAuth::new(b"0123456789abcdef0123456789abcdef");
        let now = 1_000_000;
        let sig = a.sign("POST", "/internal/want", "n1", b"{}", now);
        let headers = |s: &PeerSignature| {
            let (n, t, o, g) = (
                s.node.clone(),
                s.time.clone(),
                s.nonce.clone(),
                s.signature.clone(),
            );
            move |h: &'static str| -> Option<String> {
                Some(match h {
                    PEER_NODE => n.clone(),
                    PEER_TIME => t.clone(),
                    PEER_NONCE => o.clone(),
                    PEER_SIGNATURE => g.clone(),
                    _ => return None,
                })
            }
        };
        let check =
            |auth: &PeerAuth, s: &PeerSignature, method: &str, path: &str, body: &[u8], at: u64| {
                let h = headers(s);
                let owned: Vec<(&'static str, String)> =
                    [PEER_NODE, PEER_TIME, PEER_NONCE, PEER_SIGNATURE]
                        .into_iter()
                        .filter_map(|n| h(n).map(|v| (n, v)))
                        .collect();
                auth.verify(
                    method,
                    path,
                    |n| owned.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str()),
                    body,
                    at,
                )
            };
        assert_eq!(
            check(&a, &sig, "POST", "/internal/want", b"{}", now + 5),
            Ok("n1".into())
        );
        assert_eq!(
            check(&a, &sig, "POST", "/internal/want", b"{}", now + 6),
            Err(PeerAuthError::Replayed)
        );
        let sig = a.sign("POST", "/internal/want", "n1", b"{}", now);
        assert_eq!(
            check(&a, &sig, "POST", "/internal/want", b"{ }", now),
            Err(PeerAuthError::BadSignature),
            "body"
        );
        assert_eq!(
            check(&a, &sig, "POST", "/internal/deliver", b"{}", now),
            Err(PeerAuthError::BadSignature),
            "path"
        );
        let other = PeerAuth::new(b"another-secret-another-secret-xx");
        assert_eq!(
            check(&other, &sig, "POST", "/internal/want", b"{}", now),
            Err(PeerAuthError::BadSignature),
            "secret"
        );
        assert!(matches!(
            check(&a, &sig, "POST", "/internal/want", b"{}", now + 31_000),
            Err(PeerAuthError::Skew(_))
        ));
        let mut forged = a.sign("POST", "/internal/want", "n1", b"{}", now);
        forged.node = "n2".into();
        assert_eq!(
            check(&a, &forged, "POST", "/internal/want", b"{}", now),
            Err(PeerAuthError::BadSignature),
            "sender"
        );
    }

    #[test]
    fn api_key_check() {
        assert!(api_key_matches(Some("Bearer k"), "k"));
        assert!(!api_key_matches(Some("Bearer x"), "k"));
        assert!(!api_key_matches(Some("k"), "k"));
        assert!(!api_key_matches(None, "k"));
    }
}
