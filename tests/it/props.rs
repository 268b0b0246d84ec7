//! Property tests of every parser at the edge (proptest): addresses and ids, enqueue bodies
//! (HTTP), Kafka enqueue records, bind bodies, the handshake `auth` object, and client events.
//! The property is the same everywhere: for any input, a clear error, or a value that was
//! accepted and reads back (what the node stores or sends can be parsed again, as it was).

use proptest::prelude::*;
use serde_json::{Value, json};
use signalpost::address::{Address, ClientId, Kind, MessageId};
use signalpost::gateway::events::parse_ack;
use signalpost::gateway::handshake::identify;
use signalpost::ingest::parse::{self, Invalid, Limits};
use signalpost::mailbox::Message;
use signalpost::security::Credentials;

const LIMITS: Limits = Limits {
    max_payload: 4096,
    max_batch: 50,
};

/// Any JSON value: nested, with unicode, big and odd numbers, empty keys.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        "(client|channel|presence|work):[A-Za-z0-9._~@+=-]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("address".to_string()),
                    Just("payload".to_string()),
                    Just("id".to_string()),
                    Just("client".to_string()),
                    Just("addresses".to_string()),
                    Just("version".to_string()),
                    ".{0,8}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bytes that are JSON, JSON with its text cut or spliced, or arbitrary bytes; also JSON text
/// with escapes serde_json does not produce itself (lone surrogates, huge exponents, deep
/// nesting).
fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any_json().prop_map(|v| v.to_string().into_bytes()),
        (any_json(), any::<prop::sample::Index>()).prop_map(|(v, i)| {
            let s = v.to_string().into_bytes();
            let cut = i.index(s.len() + 1);
            s[..cut].to_vec()
        }),
        prop::collection::vec(any::<u8>(), 0..64),
        prop_oneof![
            Just(r#"{"address":"channel:a","payload":"\ud800"}"#.to_string()),
            Just(r#"{"address":"channel:a","payload":1e999}"#.to_string()),
            Just(r#"[{"address":"channel:a","payload":"\udc00x"}]"#.to_string()),
            (1usize..200).prop_map(|d| format!(
                r#"{{"address":"channel:a","payload":{}{}}}"#,
                "[".repeat(d),
                "]".repeat(d)
            )),
            "[a-z:\"{}\\[\\],0-9\\\\u]{0,40}",
        ]
        .prop_map(String::into_bytes),
    ]
}

/// An accepted message reads back: its address parses to itself, its payload is JSON within
/// the limit, and the signal built from it (what clients get) parses back with the same payload.
fn reads_back(m: &signalpost::mailbox::NewMessage) {
    assert_eq!(Address::parse(m.address.as_str()).unwrap(), m.address);
    assert_eq!(MessageId::parse(m.id.as_str()).unwrap(), m.id);
    let payload: Value = serde_json::from_str(m.payload.get()).expect("the payload is JSON");
    assert!(m.payload.get().len() <= LIMITS.max_payload);
    let signal = Message::new(m.address.clone(), 1, m.id.clone(), 1, &m.payload);
    let back = Message::from_signal(signal.signal.clone()).expect("the signal parses back");
    assert_eq!(back.address, m.address);
    let again: Value = serde_json::from_str(back.payload().get()).unwrap();
    assert_eq!(again, payload);
}

fn clear(e: &Invalid) {
    let text = match e {
        Invalid::Bad(m) | Invalid::TooLarge(m) => m,
    };
    assert!(!text.trim().is_empty(), "an error says why");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn addresses_parse_to_themselves_or_are_refused(s in prop_oneof![
        ".{0,64}",
        "(client|channel|presence|work|Client):[A-Za-z0-9._~@+=/ -]{0,210}",
    ]) {
        match Address::parse(&s) {
            Ok(a) => {
                prop_assert_eq!(a.as_str(), s.as_str());
                prop_assert_eq!(Address::parse(a.as_str()).unwrap(), a.clone());
                let json = serde_json::to_string(&a).unwrap();
                prop_assert_eq!(serde_json::from_str::<Address>(&json).unwrap(), a.clone());
                match a.kind() {
                    Kind::Client => prop_assert!(a.client().is_some()),
                    Kind::Channel => prop_assert!(a.client().is_none() && s.starts_with("channel:")),
                    Kind::Presence => prop_assert!(a.client().is_none() && s.starts_with("presence:")),
                    Kind::Work => prop_assert!(a.client().is_none() && s.starts_with("work:")),
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn valid_addresses_are_accepted(kind in "client|channel|presence", name in "[A-Za-z0-9._~@+=-]{1,200}") {
        let s = format!("{kind}:{name}");
        prop_assert!(Address::parse(&s).is_ok(), "{s}");
        let a = Address::parse(&s).unwrap();
        prop_assert!(a.partition(8) < 8);
    }

    #[test]
    fn client_and_message_ids_parse_to_themselves_or_are_refused(s in ".{0,80}") {
        if let Ok(c) = ClientId::parse(&s) {
            prop_assert_eq!(c.as_str(), s.as_str());
            prop_assert!(Address::parse(Address::of_client(&c).as_str()).is_ok());
        }
        if let Ok(m) = MessageId::parse(&s) {
            prop_assert_eq!(m.as_str(), s.as_str());
        }
    }

    #[test]
    fn enqueue_bodies_are_refused_clearly_or_read_back(body in any_body()) {
        match parse::enqueue_body(&body, LIMITS) {
            Ok((msgs, _)) => {
                prop_assert!(!msgs.is_empty() && msgs.len() <= LIMITS.max_batch);
                msgs.iter().for_each(reads_back);
            }
            Err(e) => clear(&e),
        }
    }

    #[test]
    fn valid_messages_with_any_payload_are_accepted_and_read_back(
        name in "[A-Za-z0-9._~@+=-]{1,40}",
        payload in any_json(),
        id in prop::option::of("[A-Za-z0-9._-]{1,20}"),
        batch in 1usize..4,
    ) {
        let one = match &id {
            Some(id) => json!({"address": format!("channel:{name}"), "payload": payload, "id": id}),
            None => json!({"address": format!("channel:{name}"), "payload": payload}),
        };
        let text = one.to_string();
        let body = if batch == 1 { text.clone() } else { format!("[{}]", vec![text.clone(); batch].join(",")) };
        match parse::enqueue_body(body.as_bytes(), LIMITS) {
            Ok((msgs, is_batch)) => {
                prop_assert_eq!(msgs.len(), batch);
                prop_assert_eq!(is_batch, batch > 1);
                for m in &msgs {
                    reads_back(m);
                    // Kept as the sender wrote it, byte for byte (never re-serialized).
                    prop_assert_eq!(m.payload.get(), one["payload"].to_string());
                }
            }
            // Only a payload over the size limit or nested deeper than allowed is refused.
            Err(Invalid::TooLarge(_)) => prop_assert!(one["payload"].to_string().len() > LIMITS.max_payload),
            Err(Invalid::Bad(m)) => prop_assert!(m.contains("deep"), "{m}"),
        }
    }

    #[test]
    fn kafka_records_are_refused_clearly_or_read_back(body in any_body()) {
        let mut n = 0;
        match parse::enqueue_one(&body, LIMITS, &mut || {
            n += 1;
            MessageId::parse(&format!("kafka-t-0-{n}")).unwrap()
        }) {
            Ok(m) => reads_back(&m),
            Err(e) => clear(&e),
        }
    }

    #[test]
    fn bind_bodies_are_refused_clearly_or_valid(body in any_body()) {
        match parse::binding(&body, LIMITS) {
            Ok(parse::BindRequest { client, addresses, weight, .. }) => {
                prop_assert!(weight.is_none_or(|w| (1..=1000).contains(&w)));
                prop_assert!(!addresses.is_empty() && addresses.len() <= LIMITS.max_batch);
                let own = Address::of_client(&client);
                for (i, a) in addresses.iter().enumerate() {
                    prop_assert!(a != &own, "never the client's own address");
                    prop_assert!(!addresses[..i].contains(a), "no address twice");
                }
            }
            Err(e) => clear(&e),
        }
    }

    #[test]
    fn handshake_auth_is_refused_clearly_or_identifies(auth in any_json(), token in ".{0,40}") {
        let creds = Credentials::new(&[7u8; 32], None, false, 60_000).unwrap();
        let mut auth = auth;
        if let Value::Object(o) = &mut auth {
            // Now and then a resume token of the right shape (forged) for the client named.
            if o.contains_key("clientId") && !token.is_empty() {
                o.insert("resumeToken".into(), json!(token));
            }
        }
        match identify(Some(&auth), &creds, 1) {
            Ok(id) => {
                prop_assert!(!id.resumed, "nobody resumes without a real resume token");
                for a in id.cursors.keys() {
                    prop_assert_eq!(Address::parse(a.as_str()).unwrap(), a.clone());
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn acks_are_refused_clearly_or_valid(data in prop::option::of(any_json())) {
        match parse_ack(data) {
            Ok((a, _)) => prop_assert_eq!(Address::parse(a.as_str()).unwrap(), a.clone()),
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }
}

/// A real resume token resumes, whatever else the auth object carries that is valid.
#[test]
fn a_real_resume_token_resumes() {
    let creds = Credentials::new(&[7u8; 32], None, false, 60_000).unwrap();
    let client = ClientId::parse("c-props").unwrap();
    let token = creds.resume_token(&client, None, 1);
    let id = identify(
        Some(&json!({"clientId": "c-props", "resumeToken": token, "cursors": {"channel:x": 3}})),
        &creds,
        2,
    )
    .unwrap();
    assert!(id.resumed);
}
