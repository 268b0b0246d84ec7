//! The events a client sends (`ack`, `refresh`, `history`, `read`, `members`), each within the
//! connection's event rate. (A token's end is [`super::deadlines`].)

use super::Gateway;
use super::conn::Conn;
use crate::address::Address;
use crate::routing::Subscriber;
use serde_json::{Value, json};
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use std::sync::Arc;

/// Registers the connection's event handler: one for all its events (a handler per event cost
/// every idle connection a map of boxed handlers, ~340 bytes). Events the contract does not
/// name are ignored, as Socket.IO does for events without a handler.
pub fn listen(s: &SocketRef, conn: &Arc<Conn>, svc: &Arc<Gateway>) {
    let (c, svc) = (conn.clone(), svc.clone());
    s.on_fallback(
        async move |s: SocketRef,
                    Event(event): Event,
                    TryData(data): TryData<Value>,
                    ack: AckSender| {
            let Some(kind) = Kind::of(&event) else { return };
            let data = data.ok();
            // An ack is charged in `on_ack` (one that answers what the node sent is not).
            if !matches!(kind, Kind::Ack)
                && let Err(first) = c.allow_event(true)
            {
                return refused(&s, &svc, first);
            }
            match kind {
                Kind::Ack => on_ack(&s, &c, &svc, data).await,
                Kind::Refresh => on_refresh(&c, &svc, data, ack),
                Kind::Ask(kind) => {
                    let answer = match c.ask() {
                        Some(_one) => match kind {
                            Ask::History => history(&c, &svc, data).await,
                            Ask::Members => members(&c, &svc, data).await,
                        }
                        .unwrap_or_else(|e| json!({ "error": e })),
                        None => json!({ "error": ONE_AT_A_TIME }),
                    };
                    let _ = ack.send(&answer);
                }
                Kind::Read => {
                    // A refusal comes as an `error` event, as for `ack`; an acknowledgement
                    // callback (an extra) also gets the outcome.
                    match read(&c, &svc, data).await {
                        Ok(bytes) => {
                            svc.metrics.reads.increment(1);
                            let _ = ack.send(&json!({ "ok": true, "bytes": bytes }));
                        }
                        Err(e) => {
                            error(&s, &e);
                            let _ = ack.send(&json!({ "error": e }));
                        }
                    }
                }
            }
        },
    );
}

/// The events a client may send.
#[derive(Clone, Copy)]
enum Kind {
    Ack,
    Refresh,
    Ask(Ask),
    Read,
}

impl Kind {
    fn of(event: &str) -> Option<Self> {
        Some(match event {
            "ack" => Kind::Ack,
            "refresh" => Kind::Refresh,
            "history" => Kind::Ask(Ask::History),
            "members" => Kind::Ask(Ask::Members),
            "read" => Kind::Read,
            _ => return None,
        })
    }
}

/// `ack`: stores a cursor, or says a work message is done. Charged to the connection's event
/// rate, unless it answers something the node sent: a work message the client holds (at most
/// `work_in_flight` × weight at a time), or a cursor ack within what this connection was
/// delivered, at most one per event emitted to it ([`Conn::ack_earned`]). A worker faster
/// than the rate had acks dropped — its messages dealt again after the ack timeout — and a
/// client acking many busy addresses (the client library acks each every 50 ms) went past
/// it; both were then closed as a flood. Acks that repeat or run ahead are charged.
async fn on_ack(s: &SocketRef, c: &Conn, svc: &Gateway, data: Option<Value>) {
    // The address, the version, and whether this client receives the address (asked once).
    let ack = parse_ack(data).map(|(a, v)| {
        let receives = c.receives(&a);
        (a, v, receives)
    });
    let answers = match &ack {
        Ok((a, v, receives)) if a.kind() == crate::address::Kind::Work => {
            *receives && svc.work.holds(a, c.client(), *v)
        }
        Ok((a, v, _)) => c.ack_earned(a, *v),
        Err(_) => false,
    };
    if let Err(first) = c.allow_event(!answers) {
        return refused(s, svc, first);
    }
    match ack {
        // A work address's ack says one message is done.
        Ok((address, version, true)) if address.kind() == crate::address::Kind::Work => {
            svc.metrics.acks.increment(1);
            if let Err(e) = svc.work.ack(&address, c.client(), version).await {
                error(s, &e.to_string());
            }
        }
        Ok((address, version, true)) => {
            svc.metrics.acks.increment(1);
            svc.acks.ack(c.client().clone(), address, version);
        }
        Ok((address, _, false)) => error(
            s,
            &format!("ack for {address}, which this client does not receive"),
        ),
        Err(m) => error(s, &m),
    }
}

/// `refresh`: a new token moves the connection's expiry; a bad one ends the connection.
fn on_refresh(c: &Conn, svc: &Gateway, data: Option<Value>, ack: AckSender) {
    let token = data.and_then(|v| v.get("token").and_then(Value::as_str).map(str::to_owned));
    let answer = match refresh(c, svc, token.as_deref()) {
        Ok(expires) => json!({ "ok": true, "expires": expires }),
        Err(reason) => {
            // The contract: a refresh with a bad token ends the connection.
            let _ = ack.send(&json!({ "error": reason }));
            c.kick(&format!("refresh refused: {reason}"));
            return;
        }
    };
    let _ = ack.send(&answer);
}

/// The read requests a client sends with an acknowledgement callback, one at a time.
#[derive(Clone, Copy)]
enum Ask {
    History,
    Members,
}

/// The answer to a `history` or `members` request sent while another is being answered.
const ONE_AT_A_TIME: &str =
    "one history or members request at a time per connection: wait for the answer to the last";

/// The address a `history` or `read` request names, when this client receives it.
fn received(conn: &Conn, event: &str, address: &str) -> Result<Address, String> {
    let address = Address::parse(address).map_err(|e| e.to_string())?;
    if !conn.receives(&address) {
        return Err(format!(
            "{event} of {address}, which this client does not receive"
        ));
    }
    Ok(address)
}

/// Most messages one `history` answer carries, and how many it carries by default.
const HISTORY_MAX: u64 = 1000;
const HISTORY_DEFAULT: u64 = 100;

/// A `history` request: `{address, since?, until?, last?, limit?}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryRequest {
    address: String,
    since: Option<u64>,
    until: Option<u64>,
    last: Option<u64>,
    limit: Option<u64>,
}

/// Answers a `history` request: up to `limit` messages of an address this client receives,
/// stamped in `since..=until`, or its `last` n; oldest first.
async fn history(conn: &Conn, svc: &Gateway, data: Option<Value>) -> Result<Value, String> {
    let req: HistoryRequest = serde_json::from_value(data.ok_or("history needs an object")?)
        .map_err(|e| format!("history: {e}"))?;
    let address = received(conn, "history", &req.address)?;
    let count = |n: Option<u64>, what: &str| match n {
        Some(0) => Err(format!("{what} must be 1 to {HISTORY_MAX}")),
        Some(n) if n > HISTORY_MAX => Err(format!("{what} must be 1 to {HISTORY_MAX}")),
        n => Ok(n),
    };
    let (last, limit) = (count(req.last, "last")?, count(req.limit, "limit")?);
    let mailbox = &*svc.mailbox;
    let page = match last {
        Some(_) if req.since.is_some() || req.until.is_some() || limit.is_some() => {
            return Err("give last, or since/until/limit, not both".into());
        }
        Some(n) => crate::mailbox::history::last(mailbox, &address, n as usize).await,
        None => {
            let limit = limit.unwrap_or(HISTORY_DEFAULT) as usize;
            crate::mailbox::history::between(mailbox, &address, req.since, req.until, limit).await
        }
    }
    .map_err(|e| format!("history unavailable: {e}"))?;
    let messages: Vec<&serde_json::value::RawValue> =
        page.messages.iter().map(|m| &*m.signal).collect();
    Ok(json!({ "messages": messages }))
}

/// A `members` request: `{address, after?}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersRequest {
    address: String,
    after: Option<String>,
}

/// Answers `members`: the members of a presence address this client receives, by client id.
async fn members(conn: &Conn, svc: &Gateway, data: Option<Value>) -> Result<Value, String> {
    let req: MembersRequest = serde_json::from_value(data.ok_or("members needs an object")?)
        .map_err(|e| format!("members: {e}"))?;
    let address = received(conn, "members", &req.address)?;
    if address.kind() != crate::address::Kind::Presence {
        return Err(format!(
            "{address} has no members: only presence: addresses do"
        ));
    }
    let after = req
        .after
        .as_deref()
        .map(crate::address::ClientId::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    // (More than a page: `truncated`, and the next page comes `after` the last one.)
    let (list, truncated) = crate::presence::members_page(&*svc.presence, &address, after.as_ref())
        .await
        .map_err(|e| format!("members unavailable: {e}"))?;
    Ok(json!({ "members": list, "truncated": truncated }))
}

/// Most versions one `read` event may mark.
const READ_MAX: usize = 1000;

/// A `read` request: `{address, versions: [..]}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadRequest {
    address: String,
    versions: Vec<u64>,
}

/// Marks single messages read (`read`), for an address this client receives, up to its head.
/// Returns the bytes the client's read marks of that address take.
async fn read(conn: &Conn, svc: &Gateway, data: Option<Value>) -> Result<usize, String> {
    let req: ReadRequest = serde_json::from_value(data.ok_or("read needs an object")?)
        .map_err(|e| format!("read: {e}"))?;
    let address = received(conn, "read", &req.address)?;
    if req.versions.is_empty() || req.versions.len() > READ_MAX {
        return Err(format!("versions must hold 1 to {READ_MAX} versions"));
    }
    let head = svc
        .mailbox
        .heads(std::slice::from_ref(&address))
        .await
        .map_err(|e| format!("read unavailable: {e}"))?[0];
    if let Some(v) = req.versions.iter().find(|v| **v == 0 || **v > head.head) {
        return Err(format!(
            "version {v} of {address} does not exist (versions are 1 to the head, {})",
            head.head
        ));
    }
    let ttl = (svc.config.retention_secs).min(u32::MAX as u64) as u32;
    svc.reads
        .mark(conn.client(), &address, &req.versions, head.low, ttl)
        .await
        .map_err(|e| format!("read unavailable: {e}"))
}

/// Checks a `refresh`: a valid token of the same user. Returns the new expiry (ms).
fn refresh(conn: &Conn, svc: &Gateway, token: Option<&str>) -> Result<u64, String> {
    let Some(token) = token else {
        return Err("refresh needs { token }".into());
    };
    if !svc.credentials.checks_tokens() {
        return Err("this deployment does not check client tokens".into());
    }
    let user = svc
        .credentials
        .check_token(Some(token))
        .map_err(|e| e.to_string())?
        .ok_or("no user in the token")?;
    if Some(user.id.as_str()) != conn.user() {
        return Err(format!(
            "the token is for {:?}, not for this connection's user",
            user.id
        ));
    }
    svc.gate.deadlines.moved(conn, user.expires_ms);
    Ok(user.expires_ms)
}

fn error(s: &SocketRef, message: &str) {
    let _ = s.emit("error", &json!({ "message": message }));
}

/// Tells the client, once, that its events are being dropped.
fn refused(s: &SocketRef, svc: &Gateway, first: bool) {
    if first {
        error(
            s,
            &format!(
                "rate limit: at most {} events per second; events past it are dropped, and a connection that keeps sending them is closed",
                svc.config.limits.event_rate_per_connection
            ),
        );
    }
}

pub fn parse_ack(data: Option<Value>) -> Result<(Address, u64), String> {
    let bad = || "ack needs { address: string, version: non-negative integer }".to_string();
    let v = data.ok_or_else(bad)?;
    let address = v.get("address").and_then(Value::as_str).ok_or_else(bad)?;
    let version = v.get("version").and_then(Value::as_u64).ok_or_else(bad)?;
    let address = Address::parse(address).map_err(|e| e.to_string())?;
    Ok((address, version))
}
