//! Domain newtypes that validate once at the edge: [`Address`], [`ClientId`], [`MessageId`].
//!
//! Everything past the edge (HTTP, Kafka, Socket.IO) holds these types, so the rest of the crate
//! never re-checks syntax. They are cheap to clone (`Arc<str>` inside).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::sync::Arc;

/// Longest allowed `name` part of an address, in bytes (contract: 1–200 bytes).
pub const MAX_NAME_LEN: usize = 200;
/// Longest allowed message id, in bytes.
pub const MAX_ID_LEN: usize = 200;

/// Why a piece of input was not a valid address, client id or message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("invalid address {0:?}: expected kind:name with kind client or channel")]
    Kind(String),
    #[error("invalid address {0:?}: name must be 1-200 bytes of [A-Za-z0-9._~@+=-]")]
    Name(String),
    #[error("invalid client id {0:?}: must be 1-200 bytes of [A-Za-z0-9._~@+=-]")]
    ClientId(String),
    #[error("invalid message id {0:?}: must be a string of 1-200 bytes")]
    MessageId(String),
}

/// The two kinds of address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// One client identity, which outlives its connections.
    Client,
    /// A named group that clients are bound to.
    Channel,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~@+=-".contains(&b))
}

/// A validated `kind:name` address.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(Arc<str>);

impl Address {
    /// Parses and validates an address.
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        let (kind, name) = s
            .split_once(':')
            .ok_or_else(|| AddressError::Kind(s.into()))?;
        if kind != "client" && kind != "channel" {
            return Err(AddressError::Kind(s.into()));
        }
        if !valid_name(name) {
            return Err(AddressError::Name(s.into()));
        }
        Ok(Self(s.into()))
    }

    /// The address of a client's own mailbox.
    pub fn of_client(client: &ClientId) -> Self {
        Self(format!("client:{}", client.as_str()).into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn kind(&self) -> Kind {
        if self.0.starts_with("client:") {
            Kind::Client
        } else {
            Kind::Channel
        }
    }

    /// For a `client:` address, the client it belongs to.
    pub fn client(&self) -> Option<ClientId> {
        self.0.strip_prefix("client:").map(|n| ClientId(n.into()))
    }
}

/// A validated client identity (the `name` of its `client:` address).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(Arc<str>);

impl ClientId {
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if valid_name(s) {
            Ok(Self(s.into()))
        } else {
            Err(AddressError::ClientId(s.into()))
        }
    }

    /// A fresh random client id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string().into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A message id: the idempotency key of a send, unique per address within the retention period.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(Arc<str>);

impl MessageId {
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if !s.is_empty() && s.len() <= MAX_ID_LEN {
            Ok(Self(s.into()))
        } else {
            Err(AddressError::MessageId(s.into()))
        }
    }

    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string().into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                <$t>::parse(&s).map_err(serde::de::Error::custom)
            }
        }
        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}
string_newtype!(Address);
string_newtype!(ClientId);
string_newtype!(MessageId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_addresses() {
        let a = Address::parse("channel:news.eu-1~x@y+z=").unwrap();
        assert_eq!(a.kind(), Kind::Channel);
        let c = Address::parse("client:abc").unwrap();
        assert_eq!(c.client().unwrap().as_str(), "abc");
        assert_eq!(Address::of_client(&ClientId::parse("abc").unwrap()), c);
    }

    #[test]
    fn rejects_bad_addresses_naming_them() {
        for bad in [
            "news",
            "topic:x",
            "channel:",
            "channel:a b",
            "channel:ä",
            "client:a/b",
        ] {
            let e = Address::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(Address::parse(&format!("channel:{}", "a".repeat(200))).is_ok());
        assert!(Address::parse(&format!("channel:{}", "a".repeat(201))).is_err());
    }

    #[test]
    fn serde_validates() {
        let ok: Address = serde_json::from_str("\"channel:x\"").unwrap();
        assert_eq!(ok.as_str(), "channel:x");
        assert!(serde_json::from_str::<Address>("\"x\"").is_err());
        assert!(serde_json::from_str::<MessageId>("\"\"").is_err());
    }
}
