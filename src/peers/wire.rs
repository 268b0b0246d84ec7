//! The frames nodes send each other (JSON): interests (`POST /internal/want`) and deliveries
//! (`POST /internal/deliver`, an array of frames, in order).

use crate::address::{Address, ClientId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// `POST /internal/want`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Want {
    pub node: String,
    pub url: String,
    pub session: String,
    #[serde(default)]
    pub snapshot: bool,
    #[serde(default)]
    pub add: Vec<Address>,
    #[serde(default)]
    pub remove: Vec<Address>,
}

/// `POST /internal/deliver`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deliver {
    Signals {
        signals: Vec<Box<RawValue>>,
        /// When the sender's append was durable (its wall clock, µs): the receiver measures the
        /// hop (`signalpost_append_to_handoff_seconds{route="peer"}`).
        #[serde(default)]
        appended_us: u64,
    },
    Bound {
        client: ClientId,
        bindings: Vec<(Address, u64)>,
    },
    Unbound {
        client: ClientId,
        removed: Vec<(Address, u64)>,
    },
    /// A client became (`joined`) or stopped being a member of a presence address.
    Presence {
        address: Address,
        client: ClientId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        joined: bool,
    },
    /// Between the work dispatchers ([`crate::work::cluster`]).
    Work(crate::work::Frame),
    /// The answer of a `?wait=true` operation, as the ingest side wrote it
    /// (`ingest::wire`): opaque here, handed to the receiving node's [`crate::routing::Replies`].
    Applied {
        ticket: String,
        outcome: Box<RawValue>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::MessageId;
    use crate::mailbox::Message;

    /// Every frame survives the trip between nodes (raw signals are not re-parsed on the way).
    #[test]
    fn frames_round_trip() {
        let a = Address::parse("channel:x").unwrap();
        let payload = RawValue::from_string(r#"{"k":[1,"é"]}"#.into()).unwrap();
        let m = Message::new(a.clone(), 7, MessageId::parse("m-7").unwrap(), 42, &payload);
        let frames = [
            Deliver::Signals {
                signals: vec![m.signal.clone()],
                appended_us: 9,
            },
            Deliver::Applied {
                ticket: "t".into(),
                outcome: RawValue::from_string(r#"{"refused":{"reason":"r"}}"#.into()).unwrap(),
            },
            Deliver::Bound {
                client: ClientId::parse("c").unwrap(),
                bindings: vec![(a.clone(), 3)],
            },
            Deliver::Presence {
                address: Address::parse("presence:p").unwrap(),
                client: ClientId::parse("c").unwrap(),
                user: Some("u".into()),
                joined: false,
            },
        ];
        for f in frames {
            let bytes = serde_json::to_vec(&f).unwrap();
            let back: Deliver = serde_json::from_slice(&bytes).unwrap();
            match back {
                Deliver::Signals {
                    signals: s,
                    appended_us,
                } => {
                    assert_eq!(appended_us, 9);
                    let got = Message::from_signal(s[0].clone()).unwrap();
                    assert_eq!((got.version, got.ts, got.id.as_str()), (7, 42, "m-7"));
                    assert_eq!(got.payload().get(), payload.get());
                }
                Deliver::Applied { ticket, outcome } => {
                    assert_eq!(ticket, "t");
                    assert_eq!(outcome.get(), r#"{"refused":{"reason":"r"}}"#);
                }
                Deliver::Bound { bindings, .. } => assert_eq!(bindings, vec![(a.clone(), 3)]),
                Deliver::Presence {
                    address,
                    user,
                    joined,
                    ..
                } => assert_eq!(
                    (address.as_str(), user.as_deref(), joined),
                    ("presence:p", Some("u"), false)
                ),
                Deliver::Unbound { .. } | Deliver::Work(_) => unreachable!(),
            }
        }
    }
}
