//! The handshake `auth` object: parse it strictly, check the JWT and resume token, and decide
//! the client identity. Every refusal is an [`AuthError`] whose text the client gets in
//! `connect_error`.

use crate::address::{Address, ClientId};
use crate::security::{AuthError, Credentials, User};
use serde_json::Value;
use std::collections::HashMap;

/// Who connected, decided in the connect middleware.
#[derive(Debug, Clone)]
pub struct Identity {
    pub client: ClientId,
    pub resumed: bool,
    /// The JWT's user, when a valid token was given.
    pub user: Option<User>,
    /// `auth.cursors`, validated.
    pub cursors: HashMap<Address, u64>,
}

/// Parses and checks the `auth` object.
pub fn identify(
    auth: Option<&Value>,
    creds: &Credentials,
    now_ms: u64,
) -> Result<Identity, AuthError> {
    let empty = serde_json::Map::new();
    let obj = match auth {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(o)) => o,
        Some(_) => return Err(AuthError::BadAuth("auth must be an object".into())),
    };
    let string = |key: &str| -> Result<Option<&str>, AuthError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(AuthError::BadAuth(format!("auth.{key} must be a string"))),
        }
    };
    let user = creds.check_token(string("token")?)?;
    let client = match (string("clientId")?, string("resumeToken")?) {
        (Some(id), Some(token)) => {
            let id = ClientId::parse(id)
                .map_err(|e| AuthError::BadAuth(format!("auth.clientId: {e}")))?;
            creds.check_resume(&id, user.as_ref().map(|u| u.id.as_str()), token, now_ms)?;
            Some(id)
        }
        (Some(_), None) => {
            return Err(AuthError::BadAuth(
                "auth.clientId needs auth.resumeToken".into(),
            ));
        }
        (None, Some(_)) => return Err(AuthError::ResumeWithoutClient),
        (None, None) => None,
    };
    let mut cursors = HashMap::new();
    match obj.get("cursors") {
        None | Some(Value::Null) => {}
        Some(Value::Object(c)) => {
            for (k, v) in c {
                let a = Address::parse(k)
                    .map_err(|e| AuthError::BadAuth(format!("auth.cursors: {e}")))?;
                let v = v.as_u64().ok_or_else(|| {
                    AuthError::BadAuth(format!(
                        "auth.cursors[{k:?}] must be a non-negative integer"
                    ))
                })?;
                cursors.insert(a, v);
            }
        }
        Some(_) => return Err(AuthError::BadAuth("auth.cursors must be an object".into())),
    }
    let resumed = client.is_some();
    Ok(Identity {
        client: client.unwrap_or_else(ClientId::generate),
        resumed,
        user,
        cursors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn new_and_resumed_clients() {
        let creds = Credentials::new(b"secret", None, false, 1000).unwrap();
        let fresh = identify(None, &creds, 0).unwrap();
        assert!(!fresh.resumed);
        let token = creds.resume_token(&fresh.client, None, 0);
        let auth = json!({"clientId": fresh.client.as_str(), "resumeToken": token, "cursors": {"channel:a": 4}});
        let back = identify(Some(&auth), &creds, 0).unwrap();
        assert!(back.resumed);
        assert_eq!(back.client, fresh.client);
        assert_eq!(back.cursors[&Address::parse("channel:a").unwrap()], 4);
    }

    #[test]
    fn refusals_say_why() {
        let creds = Credentials::new(b"secret", None, false, 1000).unwrap();
        let cases = [
            (json!("x"), "auth must be an object"),
            (
                json!({"clientId": "abc", "resumeToken": "forged"}),
                "invalid resume token",
            ),
            (json!({"clientId": "abc"}), "needs auth.resumeToken"),
            (json!({"resumeToken": "x"}), "without clientId"),
            (
                json!({"clientId": 5, "resumeToken": "x"}),
                "auth.clientId must be a string",
            ),
            (json!({"cursors": {"nope": 1}}), "auth.cursors"),
            (json!({"cursors": {"channel:a": -1}}), "non-negative"),
        ];
        for (auth, want) in cases {
            let e = identify(Some(&auth), &creds, 0).unwrap_err().to_string();
            assert!(e.contains(want), "{auth}: {e}");
        }
    }
}
