//! Parsing and validating operations, shared by every way in: HTTP bodies and Kafka record
//! values are the same JSON, so they are checked by the same code and refused with the same
//! reasons (an HTTP 400/413, or a dead-letter record).

use crate::address::{Address, ClientId, MessageId};
use crate::mailbox::NewMessage;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// Why an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{0}")]
    Bad(String),
    /// The payload (or the whole body) is over a size limit.
    #[error("{0}")]
    TooLarge(String),
}

fn bad(m: impl Into<String>) -> Invalid {
    Invalid::Bad(m.into())
}

/// The limits validation applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_payload: usize,
    pub max_batch: usize,
}

/// Deepest nesting of arrays and objects a payload may have.
pub const MAX_DEPTH: usize = 64;

/// Checks that a payload can be written back as it is read: every string valid Unicode (no lone
/// surrogate escapes such as `"\ud800"`), every number finite as a double (no `1e999999`), and
/// nesting no deeper than [`MAX_DEPTH`]. A payload that passes is stored as it came.
pub fn check_payload(raw: &RawValue) -> Result<(), String> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Depth(0)
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| {
            let e = e.to_string();
            // serde_json names the position in the payload; keep the reason readable.
            let reason = e.split(" at line ").next().unwrap_or(&e);
            if reason.contains("surrogate") || reason.contains("hex escape") {
                format!("a string holds a lone surrogate escape, which is not Unicode ({reason})")
            } else {
                reason.to_string()
            }
        })
}

/// A visitor that walks a JSON value, decoding every string and number, at most
/// [`MAX_DEPTH`] levels deep.
struct Depth(usize);

impl<'de> serde::de::DeserializeSeed<'de> for Depth {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Depth {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(E::custom("a number that is not finite"))
        }
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.deeper::<A::Error>()?;
        while seq.next_element_seed(Depth(inner))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.deeper::<A::Error>()?;
        while map
            .next_entry_seed(std::marker::PhantomData::<String>, Depth(inner))?
            .is_some()
        {}
        Ok(())
    }
}

impl Depth {
    fn deeper<E: serde::de::Error>(self) -> Result<usize, E> {
        if self.0 >= MAX_DEPTH {
            Err(E::custom(format!("nested deeper than {MAX_DEPTH} levels")))
        } else {
            Ok(self.0 + 1)
        }
    }
}

#[derive(Deserialize)]
struct EnqueueIn<'a> {
    #[serde(borrow)]
    address: Option<&'a RawValue>,
    /// Missing is `None`; `null` is a payload like any other JSON value (a plain
    /// `Option<&RawValue>` would read `null` as missing).
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, Invalid> {
    serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

/// Validates one message; `at` names it in errors of a batch; `default_id` gives the id of a
/// message that has none.
fn message(
    m: EnqueueIn<'_>,
    limits: Limits,
    at: &str,
    default_id: &mut dyn FnMut() -> MessageId,
) -> Result<NewMessage, Invalid> {
    let address = m
        .address
        .ok_or_else(|| bad(format!("{at}address is required")))?;
    let address: String = serde_json::from_str(address.get())
        .map_err(|_| bad(format!("{at}address must be a string")))?;
    let address = Address::parse(&address).map_err(|e| bad(format!("{at}{e}")))?;
    let payload = m
        .payload
        .ok_or_else(|| bad(format!("{at}payload is required")))?;
    if payload.get().len() > limits.max_payload {
        return Err(Invalid::TooLarge(format!(
            "{at}payload is {} bytes, over the limit of {}",
            payload.get().len(),
            limits.max_payload
        )));
    }
    check_payload(payload).map_err(|e| bad(format!("{at}payload: {e}")))?;
    let (id, minted) = match m.id {
        None => (default_id(), true),
        Some(raw) if raw.get() == "null" => (default_id(), true),
        Some(raw) => {
            let s: String = serde_json::from_str(raw.get())
                .map_err(|_| bad(format!("{at}id must be a string")))?;
            (
                MessageId::parse(&s).map_err(|e| bad(format!("{at}{e}")))?,
                false,
            )
        }
    };
    Ok(NewMessage {
        address,
        id,
        payload: payload.to_owned(),
        // Minted here; whoever appends decides whether it can vouch for a first delivery.
        new_id: minted,
    })
}

/// One message `{address, payload, id?}`.
pub fn enqueue_one(
    bytes: &[u8],
    limits: Limits,
    default_id: &mut dyn FnMut() -> MessageId,
) -> Result<NewMessage, Invalid> {
    message(json(bytes)?, limits, "", default_id)
}

/// One message, or (when the body is a JSON array) a batch of them; the flag says which.
/// A batch is validated whole: one bad element refuses it, naming its index.
pub fn enqueue_body(bytes: &[u8], limits: Limits) -> Result<(Vec<NewMessage>, bool), Invalid> {
    let first = bytes.iter().find(|c| !c.is_ascii_whitespace()).copied();
    if first != Some(b'[') {
        return Ok((
            vec![enqueue_one(bytes, limits, &mut MessageId::generate)?],
            false,
        ));
    }
    let items: Vec<EnqueueIn<'_>> = json(bytes)?;
    if items.is_empty() {
        return Err(bad("the batch is empty"));
    }
    if items.len() > limits.max_batch {
        return Err(bad(format!(
            "the batch has {} messages, over the limit of {}",
            items.len(),
            limits.max_batch
        )));
    }
    let msgs = items
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(m, limits, &format!("[{i}]: "), &mut MessageId::generate))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((msgs, true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindIn {
    client: Value,
    addresses: Value,
    rewind: Option<Value>,
    weight: Option<Value>,
    /// Set by nodes on the records they produce, to match the answer to the waiting request.
    #[serde(default, rename = "ticket")]
    _ticket: Option<String>,
}

/// A parsed bind or unbind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindRequest {
    pub client: ClientId,
    pub addresses: Vec<Address>,
    pub rewind: Option<super::Rewind>,
    /// For the `work:` addresses of a bind: their share of the work (1–1000).
    pub weight: Option<u32>,
}

impl BindRequest {
    /// The command: a bind, or an unbind (which takes neither `rewind` nor `weight`).
    pub fn into_command(self, bind: bool) -> Result<super::Command, Invalid> {
        let BindRequest {
            client,
            addresses,
            rewind,
            weight,
        } = self;
        if bind {
            return Ok(super::Command::Bind {
                client,
                addresses,
                rewind,
                weight,
            });
        }
        if rewind.is_some() || weight.is_some() {
            return Err(bad(
                "rewind and weight belong to a bind (connect), not to an unbind (disconnect)",
            ));
        }
        Ok(super::Command::Unbind { client, addresses })
    }
}

/// `{client, addresses: [..], rewind?, weight?}` of a bind or unbind (`rewind`: a count, or
/// `{since: <ms>}`; `weight`: 1–1000, for `work:` addresses).
pub fn binding(bytes: &[u8], limits: Limits) -> Result<BindRequest, Invalid> {
    let b: BindIn = json(bytes)?;
    let weight = match &b.weight {
        None | Some(Value::Null) => None,
        Some(w) => match w.as_u64() {
            Some(w @ 1..=1000) => Some(w as u32),
            _ => return Err(bad("weight must be a whole number from 1 to 1000")),
        },
    };
    let rewind = match &b.rewind {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => {
            Some(super::Rewind::Last(n.as_u64().ok_or_else(|| {
                bad("rewind must be a count (0 or more) or {since: <ms>}")
            })?))
        }
        Some(Value::Object(o)) if o.len() == 1 => match o.get("since").and_then(Value::as_u64) {
            Some(t) => Some(super::Rewind::Since(t)),
            None => return Err(bad("rewind must be a count (0 or more) or {since: <ms>}")),
        },
        Some(_) => return Err(bad("rewind must be a count (0 or more) or {since: <ms>}")),
    };
    let client = b
        .client
        .as_str()
        .ok_or_else(|| bad("client must be a string"))?;
    let client = ClientId::parse(client).map_err(|e| bad(e.to_string()))?;
    let list = b
        .addresses
        .as_array()
        .ok_or_else(|| bad("addresses must be an array"))?;
    let max = limits.max_batch;
    if list.is_empty() || list.len() > max {
        return Err(bad(format!("addresses must hold 1 to {max} addresses")));
    }
    let mut addresses = Vec::with_capacity(list.len());
    for a in list {
        let s = a.as_str().ok_or_else(|| bad("addresses must be strings"))?;
        let a = Address::parse(s).map_err(|e| bad(e.to_string()))?;
        if a.client().as_ref() == Some(&client) {
            return Err(bad(format!(
                "{a} is the client's own address; it always receives it"
            )));
        }
        if !addresses.contains(&a) {
            addresses.push(a);
        }
    }
    Ok(BindRequest {
        client,
        addresses,
        rewind,
        weight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_payload: 16,
        max_batch: 2,
    };

    #[test]
    fn reasons_name_the_problem() {
        let id = &mut || MessageId::parse("fixed").unwrap();
        assert_eq!(
            enqueue_one(br#"{"address":"channel:a","payload":1}"#, L, id)
                .unwrap()
                .id
                .as_str(),
            "fixed"
        );
        let e = |b: &[u8]| {
            enqueue_one(b, L, &mut MessageId::generate)
                .unwrap_err()
                .to_string()
        };
        assert!(e(b"nope").contains("invalid JSON"));
        // `null` is a payload (any JSON value); only a missing one is refused.
        let null = enqueue_one(br#"{"address":"channel:a","payload":null}"#, L, id).unwrap();
        assert_eq!(null.payload.get(), "null");
        assert!(e(br#"{"address":"channel:a"}"#).contains("payload is required"));
        assert!(e(br#"{"address":"x","payload":1}"#).contains("invalid address \"x\""));
        assert!(matches!(
            enqueue_one(
                br#"{"address":"channel:a","payload":"0123456789abcdef"}"#,
                L,
                &mut MessageId::generate
            ),
            Err(Invalid::TooLarge(_))
        ));
        let batch = enqueue_body(
            br#"[{"address":"channel:a","payload":1},{"address":"bad","payload":1}]"#,
            L,
        );
        assert!(batch.unwrap_err().to_string().starts_with("[1]: "));
        assert!(
            enqueue_body(br#"[{"address":"channel:a","payload":1},{"address":"channel:a","payload":2},{"address":"channel:a","payload":3}]"#, L)
                .unwrap_err()
                .to_string()
                .contains("over the limit of 2")
        );
        assert!(
            binding(br#"{"client":"c","addresses":["client:c"]}"#, L)
                .unwrap_err()
                .to_string()
                .contains("own address")
        );
        let b = binding(
            br#"{"client":"c","addresses":["channel:x","channel:x"]}"#,
            L,
        )
        .unwrap();
        assert_eq!(
            (b.client.as_str(), b.addresses.len(), b.rewind, b.weight),
            ("c", 1, None, None),
            "duplicates are folded"
        );
        // A weight, for work addresses.
        let weight = |body: &str, l: Limits| binding(body.as_bytes(), l).map(|b| b.weight);
        let body = r#"{"client":"c","addresses":["work:w"],"weight":3}"#;
        assert_eq!(weight(body, L).unwrap(), Some(3));
        for bad in ["0", "1001", "2.5", "\"3\""] {
            let body = format!(r#"{{"client":"c","addresses":["work:w"],"weight":{bad}}}"#);
            assert!(
                weight(&body, L)
                    .unwrap_err()
                    .to_string()
                    .contains("weight must be")
            );
        }
        let unbind = binding(body.as_bytes(), L).unwrap().into_command(false);
        assert!(unbind.unwrap_err().to_string().contains("not to an unbind"));
        let rewind = |body: &str| binding(body.as_bytes(), L).map(|b| b.rewind);
        use super::super::Rewind;
        assert_eq!(
            rewind(r#"{"client":"c","addresses":["channel:x"],"rewind":5}"#).unwrap(),
            Some(Rewind::Last(5))
        );
        assert_eq!(
            rewind(r#"{"client":"c","addresses":["channel:x"],"rewind":{"since":17}}"#).unwrap(),
            Some(Rewind::Since(17))
        );
        for bad in [
            r#"-1"#,
            r#"1.5"#,
            r#""3""#,
            r#"{"since":-2}"#,
            r#"{"since":1,"x":2}"#,
            r#"[]"#,
        ] {
            let body = format!(r#"{{"client":"c","addresses":["channel:x"],"rewind":{bad}}}"#);
            assert!(
                rewind(&body)
                    .unwrap_err()
                    .to_string()
                    .contains("rewind must be"),
                "{bad}"
            );
        }
    }

    #[test]
    fn payloads_that_cannot_be_written_back_are_refused() {
        let big = Limits {
            max_payload: 1 << 20,
            max_batch: 2,
        };
        let one = |payload: &str| {
            let body = format!(r#"{{"address":"channel:a","payload":{payload}}}"#);
            enqueue_one(body.as_bytes(), big, &mut MessageId::generate).map(|m| m.payload)
        };
        for (payload, why) in [
            (r#""\ud800""#, "lone leading surrogate"),
            (r#"{"k":"x\udc00y"}"#, "lone trailing surrogate"),
            ("1e999999", "infinite number"),
            ("-1e400", "infinite number"),
            (
                &format!("{}1{}", "[".repeat(65), "]".repeat(65)),
                "too deep",
            ),
            (
                &format!("{}1{}", "{\"a\":".repeat(65), "}".repeat(65)),
                "too deep",
            ),
        ] {
            let e = one(payload).unwrap_err().to_string();
            assert!(e.starts_with("payload: "), "{why}: {e}");
        }
        let deepest = format!("{}1{}", "[".repeat(64), "]".repeat(64));
        for ok in [
            r#""\ud83d\ude00 fine""#,
            "1.5e300",
            r#"{"a":[1,{"b":null}],"c":true}"#,
            &deepest,
        ] {
            let p = one(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            // Accepted means readable: it parses back as a value.
            serde_json::from_str::<serde_json::Value>(p.get()).unwrap();
        }
    }
}
