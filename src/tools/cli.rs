//! The operator tools: `enqueue`, `bind`, `unbind`, `mailbox`, `client`, `nodes`, `tail`. Each
//! talks to a node's public HTTP API (and `tail` to its Socket.IO endpoint), prints JSON, and
//! exits non-zero with the server's reason on an error.

use super::client::{ClientError, Event, Http, Socket};
use serde_json::{Value, json};
use std::io::{BufRead, Write};
use std::path::PathBuf;

/// Where the node is.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The node's URL
    #[arg(
        long,
        env = "SIGNALPOST_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// The node's API key, if it has one (sent as a Bearer header, never in a URL)
    #[arg(
        long,
        env = "SIGNALPOST_API_KEY",
        global = true,
        hide_env_values = true
    )]
    pub api_key: Option<String>,
}

impl Target {
    async fn http(&self) -> Result<Http, ClientError> {
        Http::connect(&self.url, self.api_key.clone()).await
    }
}

/// `enqueue`: send one message, or every line of a JSON-lines file.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  signalpost enqueue channel:news '{\"text\":\"hi\"}' --wait\n  signalpost enqueue --file messages.jsonl          # lines of {\"address\",\"payload\",\"id\"?}\n  signalpost enqueue channel:news --file payloads.jsonl   # lines of payloads for one address"
)]
pub struct EnqueueArgs {
    /// The address (channel:… or client:…)
    pub address: Option<String>,
    /// The payload, as JSON
    pub payload: Option<String>,
    /// The message id (idempotency key); default: a new UUID
    #[arg(long)]
    pub id: Option<String>,
    /// Wait until appended and print the version
    #[arg(long)]
    pub wait: bool,
    /// A file of JSON lines to send (messages, or payloads when ADDRESS is given)
    #[arg(long, conflicts_with_all = ["payload", "id"])]
    pub file: Option<PathBuf>,
    /// Messages per request when sending a file
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
}

fn parse_payload(s: &str) -> Result<Value, ClientError> {
    serde_json::from_str(s).map_err(|e| ClientError::Input(format!("the payload is not JSON: {e}")))
}

pub async fn enqueue(t: &Target, a: EnqueueArgs) -> Result<(), ClientError> {
    let mut http = t.http().await?;
    let path = if a.wait {
        "/server/enqueue?wait=true"
    } else {
        "/server/enqueue"
    };
    let Some(file) = a.file else {
        let address = a
            .address
            .ok_or_else(|| ClientError::Input("give ADDRESS and PAYLOAD, or --file".into()))?;
        let payload = parse_payload(
            a.payload
                .as_deref()
                .ok_or_else(|| ClientError::Input("give a PAYLOAD (JSON)".into()))?,
        )?;
        let mut msg = json!({ "address": address, "payload": payload });
        if let Some(id) = a.id {
            msg["id"] = json!(id);
        }
        println!("{}", http.json("POST", path, Some(&msg)).await?);
        return Ok(());
    };
    let f = std::fs::File::open(&file)
        .map_err(|e| ClientError::Input(format!("{}: {e}", file.display())))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta})")
            .expect("valid template"),
    );
    let mut batch = Vec::with_capacity(a.batch);
    let (mut sent, mut read) = (0u64, 0u64);
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| ClientError::Input(format!("{}: {e}", file.display())))?;
        read += line.len() as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| {
            ClientError::Input(format!("{}:{}: not JSON: {e}", file.display(), n + 1))
        })?;
        batch.push(match &a.address {
            Some(addr) => json!({ "address": addr, "payload": v }),
            None => v,
        });
        if batch.len() >= a.batch.max(1) {
            sent += send_batch(&mut http, path, &mut batch).await?;
            bar.set_position(read);
            bar.set_message(format!("{sent} sent"));
        }
    }
    sent += send_batch(&mut http, path, &mut batch).await?;
    bar.finish_and_clear();
    eprintln!("{sent} messages sent from {}", file.display());
    Ok(())
}

async fn send_batch(
    http: &mut Http,
    path: &str,
    batch: &mut Vec<Value>,
) -> Result<u64, ClientError> {
    if batch.is_empty() {
        return Ok(0);
    }
    let body = Value::Array(std::mem::take(batch));
    let r = http.json("POST", path, Some(&body)).await?;
    Ok(r["results"].as_array().map(|a| a.len() as u64).unwrap_or(0))
}

/// `bind` / `unbind`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  signalpost bind 3f2a9c… channel:news channel:sports")]
pub struct BindArgs {
    /// The client id
    pub client: String,
    /// The addresses
    #[arg(required = true)]
    pub addresses: Vec<String>,
}

pub async fn bind(t: &Target, a: BindArgs, bind: bool) -> Result<(), ClientError> {
    let path = if bind {
        "/server/connect"
    } else {
        "/server/disconnect"
    };
    let r = t
        .http()
        .await?
        .json(
            "POST",
            path,
            Some(&json!({ "client": a.client, "addresses": a.addresses })),
        )
        .await?;
    println!("{r}");
    Ok(())
}

/// `mailbox`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  signalpost mailbox channel:news --after 100 --limit 10")]
pub struct MailboxArgs {
    pub address: String,
    /// Messages after this version
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

fn segment(s: &str) -> String {
    // Addresses and ids are [A-Za-z0-9._~@+=-] plus ':'; anything else is escaped so the server
    // can name it in its error.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._~@+=-:".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub async fn mailbox(t: &Target, a: MailboxArgs) -> Result<(), ClientError> {
    let path = format!(
        "/server/mailbox/{}?after={}&limit={}",
        segment(&a.address),
        a.after,
        a.limit
    );
    println!("{}", t.http().await?.json("GET", &path, None).await?);
    Ok(())
}

pub async fn get(t: &Target, path: &str) -> Result<(), ClientError> {
    println!("{}", t.http().await?.json("GET", path, None).await?);
    Ok(())
}

/// A POST without a body, printing the answer.
pub async fn post(t: &Target, path: &str) -> Result<(), ClientError> {
    println!("{}", t.http().await?.json("POST", path, None).await?);
    Ok(())
}

pub async fn client(t: &Target, id: &str) -> Result<(), ClientError> {
    get(t, &format!("/server/clients/{}", segment(id))).await
}

/// `tail`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  signalpost tail channel:news channel:sports | jq .payload")]
pub struct TailArgs {
    /// Addresses to follow (the tail's client is bound to each)
    #[arg(required = true)]
    pub addresses: Vec<String>,
    /// Exit after this many signals
    #[arg(long)]
    pub count: Option<u64>,
}

/// Connects as a Socket.IO client, binds itself to the addresses, and prints each signal that
/// arrives from then on as one JSON line.
pub async fn tail(t: &Target, a: TailArgs) -> Result<(), ClientError> {
    let mut s = Socket::connect(&t.url, &json!({})).await?;
    let id = s.session["clientId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    t.http()
        .await?
        .json(
            "POST",
            "/server/connect",
            Some(&json!({ "client": id, "addresses": a.addresses })),
        )
        .await?;
    eprintln!("tailing {} as client {id}", a.addresses.join(" "));
    let mut out = std::io::stdout().lock();
    let mut n = 0;
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    while a.count.is_none_or(|c| n < c) {
        let ev = tokio::select! {
            ev = s.next() => ev?,
            _ = &mut stop => break,
        };
        match ev {
            Event::Signal(raw) => {
                n += 1;
                if writeln!(out, "{raw}").and_then(|_| out.flush()).is_err() {
                    break; // the reader went away (e.g. `| head`)
                }
            }
            Event::Other(name, data) if name == "gap" => eprintln!("gap {data}"),
            Event::Other(..) => {}
        }
    }
    s.close().await;
    // Best effort: a tail's client is throwaway, so leave no bindings behind.
    let _ = t
        .http()
        .await?
        .json(
            "POST",
            "/server/disconnect",
            Some(&json!({ "client": id, "addresses": a.addresses })),
        )
        .await;
    Ok(())
}
