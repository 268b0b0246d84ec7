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
    #[error(
        "invalid address {0:?}: expected kind:name with kind client, channel, presence or work"
    )]
    Kind(String),
    #[error("invalid address {0:?}: name must be 1-200 bytes of [A-Za-z0-9._~@+=-]")]
    Name(String),
    #[error("invalid client id {0:?}: must be 1-200 bytes of [A-Za-z0-9._~@+=-]")]
    ClientId(String),
    #[error("invalid message id {0:?}: must be a string of 1-200 bytes")]
    MessageId(String),
}

/// The kinds of address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// One client identity, which outlives its connections.
    Client,
    /// A named group that clients are bound to.
    Channel,
    /// A channel whose connected bound clients are its *members*: they are told who joins and
    /// leaves ([`crate::presence`]).
    Presence,
    /// Each message goes to one of the connected bound clients ([`crate::work`]).
    Work,
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
        if !matches!(kind, "client" | "channel" | "presence" | "work") {
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
        } else if self.0.starts_with("presence:") {
            Kind::Presence
        } else if self.0.starts_with("work:") {
            Kind::Work
        } else {
            Kind::Channel
        }
    }

    /// For a `client:` address, the client it belongs to.
    pub fn client(&self) -> Option<ClientId> {
        self.0.strip_prefix("client:").map(|n| ClientId(n.into()))
    }

    /// The partition (of `partitions`) that Kafka's default partitioner — the Java client's,
    /// and librdkafka's `murmur2_random` — gives a record keyed by this address. The cluster
    /// mailbox fences writers per partition, so it must agree with Kafka on this.
    pub fn partition(&self, partitions: u32) -> u32 {
        (murmur2(self.0.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`, seed 0x9747b28c).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
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

    /// A name for the node's own records kept beside clients' (e.g. the done set of a work
    /// address, kept as read marks): it must hold a character no client id may have.
    pub(crate) fn reserved(name: &'static str) -> Self {
        debug_assert!(!valid_name(name));
        Self(name.into())
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

    /// A new id: a time-ordered UUID (version 7), so that the ids an address is given in a row
    /// sort together and a store indexing them writes one B-tree page, not one per message.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string().into())
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
        let p = Address::parse("presence:room-1").unwrap();
        assert_eq!((p.kind(), p.client()), (Kind::Presence, None));
        assert_eq!(Address::parse("work:jobs").unwrap().kind(), Kind::Work);
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
            "presences:x",
            "Presence:x",
        ] {
            let e = Address::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(Address::parse(&format!("channel:{}", "a".repeat(200))).is_ok());
        assert!(Address::parse(&format!("channel:{}", "a".repeat(201))).is_err());
    }

    #[test]
    fn murmur2_matches_kafka() {
        // Apache Kafka's own vectors (UtilsTest.testMurmur2), as signed 32-bit values.
        for (input, want) in [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ] {
            assert_eq!(murmur2(input.as_bytes()) as i32, want, "{input}");
        }
        let a = Address::parse("channel:news").unwrap();
        assert!(a.partition(8) < 8);
        assert_eq!(a.partition(1), 0);
    }

    #[test]
    fn serde_validates() {
        let ok: Address = serde_json::from_str("\"channel:x\"").unwrap();
        assert_eq!(ok.as_str(), "channel:x");
        assert!(serde_json::from_str::<Address>("\"x\"").is_err());
        assert!(serde_json::from_str::<MessageId>("\"\"").is_err());
    }
}
