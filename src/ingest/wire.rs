//! The answer of a `?wait=true` operation as it travels between nodes (the node that applied it
//! to the node whose publisher waits): [`Outcome`] to JSON and back.

use super::Outcome;
use crate::address::Address;
use crate::mailbox::Message;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::Arc;

/// The answer to a `?wait=true` operation, as it travels between nodes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireOutcome {
    Appended {
        signal: Box<RawValue>,
        duplicate: bool,
    },
    Bound {
        bindings: Vec<(Address, u64)>,
        added: usize,
    },
    Unbound {
        removed: Vec<(Address, u64)>,
    },
    Refused {
        reason: String,
    },
}

impl WireOutcome {
    pub fn from_outcome(o: &Outcome) -> Option<Self> {
        Some(match o {
            Outcome::Appended(a) => WireOutcome::Appended {
                signal: a.message.signal.clone(),
                duplicate: a.duplicate,
            },
            Outcome::Bound { bindings, added } => WireOutcome::Bound {
                bindings: bindings.clone(),
                added: *added,
            },
            Outcome::Unbound { removed } => WireOutcome::Unbound {
                removed: removed.clone(),
            },
            Outcome::Refused(reason) => WireOutcome::Refused {
                reason: reason.clone(),
            },
            Outcome::Queued => return None,
        })
    }

    pub fn into_outcome(self) -> Option<Outcome> {
        Some(match self {
            WireOutcome::Appended { signal, duplicate } => {
                Outcome::Appended(crate::mailbox::Appended {
                    message: Arc::new(Message::from_signal(signal)?),
                    duplicate,
                })
            }
            WireOutcome::Bound { bindings, added } => Outcome::Bound { bindings, added },
            WireOutcome::Unbound { removed } => Outcome::Unbound { removed },
            WireOutcome::Refused { reason } => Outcome::Refused(reason),
        })
    }
}

impl Outcome {
    /// The outcome as the wire carries it (`None` for `Queued`, which is never waited for).
    pub fn to_wire(&self) -> Option<Box<RawValue>> {
        let w = WireOutcome::from_outcome(self)?;
        serde_json::value::to_raw_value(&w).ok()
    }

    /// An outcome read from the wire (`None` when it is not one).
    pub fn from_wire(raw: &RawValue) -> Option<Self> {
        serde_json::from_str::<WireOutcome>(raw.get())
            .ok()?
            .into_outcome()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::MessageId;

    #[test]
    fn outcomes_round_trip() {
        let a = Address::parse("channel:x").unwrap();
        let payload = RawValue::from_string(r#"{"k":[1,"é"]}"#.into()).unwrap();
        let m = Message::new(a.clone(), 7, MessageId::parse("m-7").unwrap(), 42, &payload);
        let appended = Outcome::Appended(crate::mailbox::Appended {
            message: Arc::new(m),
            duplicate: true,
        });
        match Outcome::from_wire(&appended.to_wire().unwrap()) {
            Some(Outcome::Appended(x)) => {
                assert!(x.duplicate);
                assert_eq!((x.message.version, x.message.ts), (7, 42));
                assert_eq!(x.message.payload().get(), payload.get());
            }
            other => panic!("{other:?}"),
        }
        let refused = Outcome::Refused("no".into());
        assert!(matches!(
            Outcome::from_wire(&refused.to_wire().unwrap()),
            Some(Outcome::Refused(r)) if r == "no"
        ));
        assert!(Outcome::Queued.to_wire().is_none());
        let bad = RawValue::from_string("{}".into()).unwrap();
        assert!(Outcome::from_wire(&bad).is_none());
    }
}
