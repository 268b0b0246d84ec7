//! The events a client sends (`ack`, `refresh`, `history`, `read`, `members`), each within the
//! connection's event rate, and the end of a connection whose token expired.

use super::Gateway;
use super::conn::Conn;
use crate::address::Address;
use crate::routing::Subscriber;
use serde_json::{Value, json};
use socketioxide::extract::{AckSender, SocketRef, TryData};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Registers the connection's event handlers.
pub fn listen(s: &SocketRef, conn: &Arc<Conn>, svc: &Arc<Gateway>) {
    {
        let (c, svc) = (conn.clone(), svc.clone());
        s.on(
            "ack",
            async move |s: SocketRef, TryData(data): TryData<Value>| {
                if let Err(first) = c.allow_event() {
                    return refused(&s, &svc, first);
                }
                match parse_ack(data.ok()) {
                    // A work address's ack says one message is done.
                    Ok((address, version))
                        if address.kind() == crate::address::Kind::Work && c.receives(&address) =>
                    {
                        svc.metrics.acks.increment(1);
                        if let Err(e) = svc.work.ack(&address, c.client(), version).await {
                            error(&s, &e.to_string());
                        }
                    }
                    Ok((address, version)) if c.receives(&address) => {
                        svc.metrics.acks.increment(1);
                        svc.acks.ack(c.client().clone(), address, version);
                    }
                    Ok((address, _)) => error(
                        &s,
                        &format!("ack for {address}, which this client does not receive"),
                    ),
                    Err(m) => error(&s, &m),
                }
            },
        );
    }
    {
        let (c, svc) = (conn.clone(), svc.clone());
        s.on(
            "refresh",
            async move |s: SocketRef, TryData(data): TryData<Value>, ack: AckSender| {
                if let Err(first) = c.allow_event() {
                    return refused(&s, &svc, first);
                }
                let token = data
                    .ok()
                    .and_then(|v| v.get("token").and_then(Value::as_str).map(str::to_owned));
                let answer = match refresh(&c, &svc, token.as_deref()) {
                    Ok(expires) => json!({ "ok": true, "expires": expires }),
                    Err(reason) => {
                        // The contract: a refresh with a bad token ends the connection.
                        let _ = ack.send(&json!({ "error": reason }));
                        c.kick(&format!("refresh refused: {reason}"));
                        return;
                    }
                };
                let _ = ack.send(&answer);
            },
        );
    }
    for (event, kind) in [("history", Ask::History), ("members", Ask::Members)] {
        let (c, svc) = (conn.clone(), svc.clone());
        s.on(
            event,
            async move |s: SocketRef, TryData(data): TryData<Value>, ack: AckSender| {
                if let Err(first) = c.allow_event() {
                    return refused(&s, &svc, first);
                }
                let answer = match c.ask() {
                    Some(_one) => match kind {
                        Ask::History => history(&c, &svc, data.ok()).await,
                        Ask::Members => members(&c, &svc, data.ok()).await,
                    }
                    .unwrap_or_else(|e| json!({ "error": e })),
                    None => json!({ "error": ONE_AT_A_TIME }),
                };
                let _ = ack.send(&answer);
            },
        );
    }
    {
        let (c, svc) = (conn.clone(), svc.clone());
        s.on(
            "read",
            async move |s: SocketRef, TryData(data): TryData<Value>, ack: AckSender| {
                if let Err(first) = c.allow_event() {
                    return refused(&s, &svc, first);
                }
                // A refusal comes as an `error` event, as for `ack`; an acknowledgement callback
                // (an extra) also gets the outcome.
                match read(&c, &svc, data.ok()).await {
                    Ok(bytes) => {
                        svc.metrics.reads.increment(1);
                        let _ = ack.send(&json!({ "ok": true, "bytes": bytes }));
                    }
                    Err(e) => {
                        error(&s, &e);
                        let _ = ack.send(&json!({ "error": e }));
                    }
                }
            },
        );
    }
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
    conn.refreshed(user.expires_ms);
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

/// Ends the connection with `kicked` `{reason: "token expired"}` when its token expires without
/// a `refresh` (one timer per connection with a token; it sleeps until the current expiry).
pub fn expire_at_token_end(conn: &Arc<Conn>) {
    let weak: Weak<Conn> = Arc::downgrade(conn);
    tokio::spawn(async move {
        loop {
            let Some(c) = weak.upgrade() else { return };
            let left = c.expires_ms().saturating_sub(crate::clock::now_ms());
            if left == 0 {
                c.kick("token expired");
                return;
            }
            drop(c);
            tokio::time::sleep(Duration::from_millis(left.min(24 * 3600 * 1000))).await;
        }
    });
}

pub fn parse_ack(data: Option<Value>) -> Result<(Address, u64), String> {
    let bad = || "ack needs { address: string, version: non-negative integer }".to_string();
    let v = data.ok_or_else(bad)?;
    let address = v.get("address").and_then(Value::as_str).ok_or_else(bad)?;
    let version = v.get("version").and_then(Value::as_u64).ok_or_else(bad)?;
    let address = Address::parse(address).map_err(|e| e.to_string())?;
    Ok((address, version))
}
