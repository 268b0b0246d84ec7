//! `signalpost bench`: drives a running node through its public interfaces only — HTTP in,
//! Socket.IO (WebSocket) clients out — and prints what it measured.
//!
//! Scenarios (each prints one result line; `all` runs them in order):
//! - `append`: messages/s enqueued over keep-alive HTTP (202), spread over many addresses, both
//!   one message per request and in batches;
//! - `fanout`: deliveries/s from one channel to many connected clients;
//! - `latency`: enqueue→delivery percentiles at a fixed rate, each message to one of many clients;
//! - `replay`: a client that missed many messages resumes; messages/s and the node's memory growth;
//! - `idle`: the node's memory per idle connection;
//! - `durable` (not in `all`): the node's durable append rate — enqueued over HTTP, through the
//!   queue (Kafka on `--backend cluster`), appended and committed, counted from the node's
//!   `/metrics` — and, with `--cassandra`, the raw rate of writing the same rows batched the same
//!   way straight into the same Cassandra (the limit the node is held to), and their ratio.
//! - `work` (not in `all`): `--workers` clients bound to one work address with weights 1, 2,
//!   3, 1, 2, 3, …, each acking every message at once; `--work-messages` sent to it in batches of
//!   100: messages dealt and acked per second, each worker's share against its weight's, and a
//!   check that every message went to one worker once and ended `done`.
//! - `presence` (not in `all`; cluster backend, `--cassandra`): what joining and leaving one
//!   presence address costs in Cassandra as it grows to `--members` members — the join and leave
//!   latency of the first and the last 10 000, and reading the whole member list.

use super::client::{ClientError, Event, Http, Socket, json_u64};
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What to run and how hard.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The node to drive (from the global `--url`)
    #[arg(skip)]
    pub url: String,
    /// The node's API key (from the global `--api-key`)
    #[arg(skip)]
    pub api_key: Option<String>,
    /// append, fanout, latency, replay, idle, or all
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// Seconds the append scenario runs for (each mode)
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent HTTP connections for appends
    #[arg(long, default_value_t = 64)]
    pub http_connections: usize,
    /// Addresses appends are spread over
    #[arg(long, default_value_t = 1000)]
    pub addresses: usize,
    /// Messages per request in the batched append mode
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Connected clients for fanout and latency
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Messages sent to the channel in the fanout scenario
    #[arg(long, default_value_t = 1000)]
    pub fanout_messages: usize,
    /// Messages per second in the latency scenario
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// HTTP connections the latency scenario sends from (open loop: message i is due at
    /// i / rate on connection i mod senders)
    #[arg(long, default_value_t = 4)]
    pub senders: u64,
    /// Messages a client misses before the replay scenario
    #[arg(long, default_value_t = 100_000)]
    pub replay_messages: usize,
    /// Idle connections held open in the idle scenario
    #[arg(long, default_value_t = 10_000)]
    pub idle_connections: usize,
    /// Messages the durable scenario sends
    #[arg(long, default_value_t = 100_000)]
    pub durable_messages: usize,
    /// Cassandra contact points for the durable scenario's raw baseline (cluster backend)
    #[arg(long)]
    pub cassandra: Option<String>,
    /// The node's keyspace, for the raw baseline and the presence scenario
    #[arg(long, default_value = "signalpost")]
    pub keyspace: String,
    /// Members the presence scenario joins to one presence address
    #[arg(long, default_value_t = 100_000)]
    pub members: usize,
    /// Clients the bindings scenario binds, reads and unbinds (each layout)
    #[arg(long, default_value_t = 20_000)]
    pub bind_clients: usize,
    /// Connect the fanout and latency clients to these nodes instead of `--url`, round-robin
    /// (comma-separated). In a cluster the latency scenario then reports deliveries on the
    /// appending node and deliveries through another node apart.
    #[arg(long)]
    pub clients_url: Option<String>,
    /// Latency scenario: write every message's timeline to this file (CSV: `kind,sent_us,took_us`
    /// — `answer` for the enqueue's HTTP answer, `delivery` for its arrival at the client;
    /// `sent_us` is the send time in µs since the Unix epoch), to see when the slow ones were sent
    #[arg(long)]
    pub trace: Option<std::path::PathBuf>,
    /// Clients the work scenario binds to one work address (weights 1, 2, 3, 1, 2, 3, …)
    #[arg(long, default_value_t = 12)]
    pub workers: usize,
    /// Messages the work scenario sends to the work address
    #[arg(long, default_value_t = 20_000)]
    pub work_messages: usize,
    /// Latency scenario: every client acks each message it receives (an `ack` event with its
    /// address and version), and the run ends by checking that the node stored each client's
    /// cursor at the last version it received (`GET /server/clients/<id>`)
    #[arg(long)]
    pub ack: bool,
}

type Res<T> = Result<T, ClientError>;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

/// Runs the scenarios; returns the report lines.
pub async fn run(args: BenchArgs) -> Res<Vec<String>> {
    let all = args.scenario == "all";
    let mut report = Vec::new();
    let mut push = |line: String| {
        println!("{line}");
        report.push(line);
    };
    let known = [
        "all", "append", "fanout", "latency", "replay", "idle", "durable", "presence", "bindings",
        "work",
    ];
    if !known.contains(&args.scenario.as_str()) {
        return Err(ClientError::Http(format!(
            "unknown scenario {:?}; one of {known:?}",
            args.scenario
        )));
    }
    if all || args.scenario == "append" {
        eprintln!(
            "append: {} s one message per request, then {} s in batches of {} …",
            args.seconds, args.seconds, args.batch
        );
        push(append(&args, 1).await?);
        push(append(&args, args.batch).await?);
    }
    if all || args.scenario == "fanout" {
        eprintln!("fanout: connecting {} clients …", args.clients);
        push(fanout(&args).await?);
    }
    if all || args.scenario == "latency" {
        eprintln!(
            "latency: {} messages/s for {} s to {} clients …",
            args.rate, args.seconds, args.clients
        );
        push(latency(&args).await?);
    }
    if all || args.scenario == "replay" {
        eprintln!("replay: filling {} messages …", args.replay_messages);
        push(replay(&args).await?);
    }
    if all || args.scenario == "idle" {
        eprintln!("idle: opening {} connections …", args.idle_connections);
        push(idle(&args).await?);
    }
    if args.scenario == "work" {
        eprintln!(
            "work: {} messages dealt to {} workers …",
            args.work_messages, args.workers
        );
        push(work(&args).await?);
    }
    if args.scenario == "presence" {
        eprintln!("presence: {} members joining one address …", args.members);
        push(presence(&args).await?);
    }
    if args.scenario == "bindings" {
        eprintln!(
            "bindings: {} clients bound, read and unbound …",
            args.bind_clients
        );
        push(bindings(&args).await?);
    }
    if args.scenario == "durable" {
        eprintln!(
            "durable: {} messages over {} addresses in requests of {} …",
            args.durable_messages, args.addresses, args.batch
        );
        push(durable(&args).await?);
    }
    println!("\nsummary ({}):", args.url);
    println!("| scenario | result |\n|---|---|");
    for line in &report {
        let (name, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        println!("| {name} | {} |", rest.trim());
    }
    Ok(report)
}

async fn append(args: &BenchArgs, batch: usize) -> Res<String> {
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let run = tag();
    let mut tasks = Vec::new();
    let started = Instant::now();
    for c in 0..args.http_connections {
        let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
        let (sent, stop, run) = (sent.clone(), stop.clone(), run.clone());
        let addresses = args.addresses;
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("valid histogram");
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let mut body = String::with_capacity(batch * 80);
                if batch > 1 {
                    body.push('[');
                }
                for k in 0..batch {
                    if k > 0 {
                        body.push(',');
                    }
                    let n = c * 1_000_003 + i;
                    body.push_str(&format!(
                        "{{\"address\":\"channel:bench-{run}-{}\",\"payload\":{{\"n\":{n}}}}}",
                        n % addresses
                    ));
                    i += 1;
                }
                if batch > 1 {
                    body.push(']');
                }
                let t = Instant::now();
                enqueue_raw(&mut http, body).await?;
                hist.record(t.elapsed().as_micros() as u64).ok();
                sent.fetch_add(batch as u64, Ordering::Relaxed);
            }
            Ok::<_, ClientError>(hist)
        }));
    }
    for sec in 1..=args.seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprint!(
            "\r  {sec:>3} s  {:>10} messages",
            sent.load(Ordering::Relaxed)
        );
    }
    eprintln!();
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3).expect("valid histogram");
    for t in tasks {
        hist.add(t.await.map_err(|e| ClientError::Http(e.to_string()))??)
            .ok();
    }
    let secs = started.elapsed().as_secs_f64();
    let n = sent.load(Ordering::Relaxed);
    Ok(format!(
        "append  batch={batch:<4} conns={} addresses={}: {:.0} messages/s ({n} in {secs:.1} s), request p50 {:.2} ms p99 {:.2} ms",
        args.http_connections,
        args.addresses,
        n as f64 / secs,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0
    ))
}

/// Posts a ready JSON body to `/server/enqueue`; anything but 202 is an error.
async fn enqueue_raw(http: &mut Http, body: String) -> Res<()> {
    let (status, b) = http
        .call("POST", "/server/enqueue", Some(Bytes::from(body)))
        .await?;
    if status != 202 {
        return Err(ClientError::Status {
            status,
            body: String::from_utf8_lossy(&b).into(),
        });
    }
    Ok(())
}

/// The nodes clients connect to: `--clients-url` (comma-separated) or `--url`.
fn client_urls(args: &BenchArgs) -> Vec<String> {
    let urls: Vec<String> = args
        .clients_url
        .as_deref()
        .unwrap_or(&args.url)
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        vec![args.url.clone()]
    } else {
        urls
    }
}

/// Which of `urls` owns each partition of the enqueue topic (from each node's `/healthz`), or
/// None when the nodes are not partitioned (embedded) or a partition has no owner among them.
async fn owners(urls: &[String], api_key: &Option<String>) -> Res<Option<(u32, Vec<usize>)>> {
    let mut count = 0;
    let mut owner: Vec<Option<usize>> = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let mut http = Http::connect(url, api_key.clone()).await?;
        let (_, body) = http.call("GET", "/healthz", None).await?;
        let health: Value = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Http(format!("{url}/healthz: {e}")))?;
        let Some(p) = health.get("partitions") else {
            return Ok(None);
        };
        count = p["count"].as_u64().unwrap_or(0) as u32;
        owner.resize(count as usize, None);
        for o in p["owned"].as_array().into_iter().flatten() {
            if let Some(slot) = o.as_u64().and_then(|o| owner.get_mut(o as usize)) {
                *slot = Some(i);
            }
        }
    }
    Ok(owner
        .into_iter()
        .collect::<Option<Vec<usize>>>()
        .map(|o| (count, o)))
}

/// Connects `n` clients and binds each to `channel` (when given); returns them after `synced`.
async fn clients(args: &BenchArgs, n: usize, channel: Option<&str>) -> Res<Vec<Socket>> {
    let mut out = Vec::with_capacity(n);
    let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
    let mut pending = Vec::new();
    let urls = client_urls(args);
    for i in 0..n {
        let url = urls[i % urls.len()].clone();
        pending.push(tokio::spawn(async move {
            let mut s = Socket::connect(&url, &json!({})).await?;
            loop {
                if let Event::Other(name, _) = s.next().await?
                    && name == "synced"
                {
                    return Ok::<_, ClientError>(s);
                }
            }
        }));
        if pending.len() >= 200 {
            for p in pending.drain(..) {
                out.push(p.await.map_err(|e| ClientError::Socket(e.to_string()))??);
            }
        }
    }
    for p in pending {
        out.push(p.await.map_err(|e| ClientError::Socket(e.to_string()))??);
    }
    if let Some(ch) = channel {
        for s in &mut out {
            let id = s.session["clientId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            http.json(
                "POST",
                "/server/connect",
                Some(&json!({ "client": id, "addresses": [ch] })),
            )
            .await?;
            loop {
                if let Event::Other(name, _) = s.next().await?
                    && name == "bound"
                {
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// Enqueues `n` messages to `address` in batches of 100, one request after the other.
async fn send_batches(http: &mut Http, address: &str, n: usize) -> Res<()> {
    let mut sent = 0;
    while sent < n {
        let k = 100.min(n - sent);
        let batch: Vec<Value> = (0..k)
            .map(|i| json!({ "address": address, "payload": { "i": sent + i } }))
            .collect();
        http.json("POST", "/server/enqueue", Some(&Value::Array(batch)))
            .await?;
        sent += k;
    }
    Ok(())
}

async fn fanout(args: &BenchArgs) -> Res<String> {
    let channel = format!("channel:fanout-{}", tag());
    let socks = clients(args, args.clients, Some(&channel)).await?;
    let total = args.fanout_messages as u64;
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for mut s in socks {
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = 0u64;
            let mut n = 0u64;
            while n < total {
                if let Event::Signal(raw) = s.next().await? {
                    let v = json_u64(&raw, "version").unwrap_or(0);
                    if v != last + 1 && last != 0 {
                        return Err(ClientError::Socket(format!(
                            "out of order: {v} after {last}"
                        )));
                    }
                    last = v;
                    n += 1;
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            s.close().await;
            Ok::<_, ClientError>(())
        }));
    }
    let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
    let started = Instant::now();
    send_batches(&mut http, &channel, args.fanout_messages).await?;
    for t in tasks {
        t.await.map_err(|e| ClientError::Socket(e.to_string()))??;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = received.load(Ordering::Relaxed);
    Ok(format!(
        "fanout  clients={} messages={}: {:.0} deliveries/s ({n} in {secs:.2} s, every client in order)",
        args.clients,
        args.fanout_messages,
        n as f64 / secs
    ))
}

async fn latency(args: &BenchArgs) -> Res<String> {
    let urls = client_urls(args);
    let mut nodes = urls.clone();
    if !nodes.contains(&args.url) {
        nodes.push(args.url.clone());
    }
    let before = owners(&nodes, &args.api_key).await?;
    let local_before = handoff_buckets(&nodes, &args.api_key, "local").await?;
    let peer_before = handoff_buckets(&nodes, &args.api_key, "peer").await?;
    let socks = clients(args, args.clients, None).await?;
    let ids: Vec<String> = socks
        .iter()
        .map(|s| {
            s.session["clientId"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let total = args.rate * args.seconds;
    let received = Arc::new(AtomicU64::new(0));
    let (done, _) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let keep_trace = args.trace.is_some();
    let ack = args.ack;
    for (mut s, id) in socks.into_iter().zip(ids.iter().cloned()) {
        let received = received.clone();
        let mut done = done.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut got = Delivered::default();
            let address = format!("client:{id}");
            loop {
                let event = tokio::select! {
                    e = s.next() => e,
                    _ = done.wait_for(|d| *d) => break,
                };
                match event {
                    Ok(Event::Signal(raw)) => {
                        let Some(t) = json_u64(&raw, "t") else {
                            continue;
                        };
                        let took = now_us().saturating_sub(t);
                        got.hist.record(took).ok();
                        if keep_trace {
                            got.trace.push((t, took));
                        }
                        let version = json_u64(&raw, "version").unwrap_or(0);
                        // A new client's own address: versions 1, 2, 3… each once, in order.
                        if version != got.last + 1 {
                            got.out_of_order += 1;
                        }
                        got.last = got.last.max(version);
                        received.fetch_add(1, Ordering::Relaxed);
                        if ack {
                            let data =
                                format!("{{\"address\":\"{address}\",\"version\":{version}}}");
                            s.emit("ack", &data).await?;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            s.close().await;
            Ok::<_, ClientError>(got)
        }));
    }
    // Open loop: message i is due at i / rate, whatever the answers take; senders on their own
    // connections, so a slow answer (a Kafka produce) does not hold back the schedule.
    let ids = Arc::new(ids);
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let senders = args.senders.max(1);
    let mut sending = Vec::new();
    for k in 0..senders {
        let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
        let ids = ids.clone();
        sending.push(tokio::spawn(async move {
            let mut trace = Vec::new();
            for i in (k..total).step_by(senders as usize) {
                tokio::time::sleep_until((started + interval * i as u32).into()).await;
                let sent = now_us();
                let body = format!(
                    "{{\"address\":\"client:{}\",\"payload\":{{\"t\":{sent}}}}}",
                    ids[i as usize % ids.len()],
                );
                enqueue_raw(&mut http, body).await?;
                if keep_trace {
                    trace.push((sent, now_us().saturating_sub(sent)));
                }
            }
            Ok::<_, ClientError>(trace)
        }));
    }
    let mut answers = Vec::new();
    for t in sending {
        answers.extend(t.await.map_err(|e| ClientError::Socket(e.to_string()))??);
    }
    let sent_rate = total as f64 / started.elapsed().as_secs_f64();
    // Everything sent: wait for the last deliveries (at most 10 s), then stop the clients.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.send_replace(true);
    let mut hist = Histogram::<u64>::new(3).expect("valid histogram");
    let mut per_client = Vec::with_capacity(tasks.len());
    let mut deliveries = Vec::new();
    let mut last = Vec::with_capacity(tasks.len());
    let mut out_of_order = 0;
    for t in tasks {
        let got = t.await.map_err(|e| ClientError::Socket(e.to_string()))??;
        hist.add(&got.hist).ok();
        per_client.push(got.hist);
        deliveries.extend(got.trace);
        last.push(got.last);
        out_of_order += got.out_of_order;
    }
    if let Some(path) = &args.trace {
        write_trace(path, &answers, &deliveries)?;
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut line = format!(
        "latency rate={}/s (sent {sent_rate:.0}/s) clients={}{}: enqueue→delivery p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms ({} of {total} delivered{})",
        args.rate,
        args.clients,
        if args.ack { ", each message acked" } else { "" },
        ms(&hist, 0.5),
        ms(&hist, 0.99),
        ms(&hist, 0.999),
        hist.max() as f64 / 1000.0,
        received.load(Ordering::Relaxed),
        if out_of_order == 0 {
            ", each client's in order, none twice".to_string()
        } else {
            format!("; ⚠ {out_of_order} out of order or twice")
        }
    );
    if args.ack {
        line.push_str(&stored_cursors(args, &ids[..], &last).await?);
    }
    // In a cluster: deliveries on the node that appended (its consumer owns the address's
    // partition) apart from deliveries through another node (one node: nothing to split).
    let after = owners(&nodes, &args.api_key).await?;
    if urls.len() > 1
        && let (Some((count, owner)), Some(after)) = (&before, &after)
    {
        let mut same = Histogram::<u64>::new(3).expect("valid histogram");
        let mut cross = same.clone();
        for (i, (h, id)) in per_client.iter().zip(ids.iter()).enumerate() {
            let address = signalpost::address::Address::parse(&format!("client:{id}"))
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let appender = owner[address.partition(*count) as usize];
            if appender == i % urls.len() {
                same.add(h).ok();
            } else {
                cross.add(h).ok();
            }
        }
        line.push_str(&format!(
            "; on the appending node p50 {:.2} ms p99 {:.2} ms ({} deliveries), through another node p50 {:.2} ms p99 {:.2} ms ({}): {:+.2} ms at p99{}",
            ms(&same, 0.5),
            ms(&same, 0.99),
            same.len(),
            ms(&cross, 0.5),
            ms(&cross, 0.99),
            cross.len(),
            ms(&cross, 0.99) - ms(&same, 0.99),
            if after.1 == *owner {
                ""
            } else {
                " (partitions moved during the run: split approximate)"
            }
        ));
    }
    // The hop itself, measured by the nodes: append durable → handed to the connections.
    let local = handoff_buckets(&nodes, &args.api_key, "local").await?;
    let peer = handoff_buckets(&nodes, &args.api_key, "peer").await?;
    let q = |b: &[(f64, f64)], a: &[(f64, f64)], q: f64| {
        bucket_quantile(b, a, q).map_or("-".to_string(), |s| format!("{:.2}", s * 1000.0))
    };
    if bucket_quantile(&peer_before, &peer, 0.5).is_some() {
        line.push_str(&format!(
            "; nodes' append→hand-off: local p50 {} ms p99 {} ms, through a peer p50 {} ms p99 {} ms",
            q(&local_before, &local, 0.5),
            q(&local_before, &local, 0.99),
            q(&peer_before, &peer, 0.5),
            q(&peer_before, &peer, 0.99),
        ));
    }
    Ok(line)
}

/// What one client of the latency scenario received.
struct Delivered {
    hist: Histogram<u64>,
    trace: Vec<(u64, u64)>,
    /// The highest version received.
    last: u64,
    /// Deliveries that were not the version after the one before (missing, twice or late).
    out_of_order: u64,
}

impl Default for Delivered {
    fn default() -> Self {
        Self {
            hist: Histogram::new(3).expect("valid histogram"),
            trace: Vec::new(),
            last: 0,
            out_of_order: 0,
        }
    }
}

/// The `--ack` check: each client's cursor, as the node stored it, is the last version the
/// client received and acked. Acks are written in batches behind the clients' backs, so this
/// waits (up to 10 s) for the last batch to land.
async fn stored_cursors(args: &BenchArgs, ids: &[String], last: &[u64]) -> Res<String> {
    let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    let mut behind = Vec::new();
    for (id, &want) in ids.iter().zip(last) {
        loop {
            let client = http
                .json("GET", &format!("/server/clients/{id}"), None)
                .await?;
            let stored = client["cursors"][format!("client:{id}")]
                .as_u64()
                .unwrap_or(0);
            if stored == want {
                break;
            }
            if Instant::now() >= deadline {
                behind.push(format!("{id}: {stored} of {want}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(if behind.is_empty() {
        format!(
            "; every client's stored cursor is its last version (checked in {:.1} s)",
            started.elapsed().as_secs_f64()
        )
    } else {
        format!(
            "; ⚠ {} of {} stored cursors behind after 10 s (e.g. {})",
            behind.len(),
            ids.len(),
            behind[0]
        )
    })
}

/// Writes the latency scenario's per-message timeline (see [`BenchArgs::trace`]), in send order.
fn write_trace(
    path: &std::path::Path,
    answers: &[(u64, u64)],
    deliveries: &[(u64, u64)],
) -> Res<()> {
    let mut rows: Vec<(u64, &str, u64)> = answers
        .iter()
        .map(|&(t, took)| (t, "answer", took))
        .chain(deliveries.iter().map(|&(t, took)| (t, "delivery", took)))
        .collect();
    rows.sort_unstable();
    let mut out = String::from("kind,sent_us,took_us\n");
    for (t, kind, took) in rows {
        out.push_str(&format!("{kind},{t},{took}\n"));
    }
    std::fs::write(path, out)
        .map_err(|e| ClientError::Input(format!("writing {}: {e}", path.display())))
}

/// The node's resident memory, from its `/metrics`.
async fn node_rss(http: &mut Http) -> Res<u64> {
    metric(http, "process_resident_memory_bytes")
        .await?
        .map(|v| v as u64)
        .ok_or_else(|| ClientError::Http("no process_resident_memory_bytes in /metrics".into()))
}

async fn replay(args: &BenchArgs) -> Res<String> {
    let first = Socket::connect(&args.url, &json!({})).await?;
    let session = first.session.clone();
    first.close().await;
    let id = session["clientId"].as_str().unwrap_or_default().to_string();
    let own = format!("client:{id}");
    let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
    let mut filled = 0;
    while filled < args.replay_messages {
        if filled % 10_000 == 0 {
            eprint!("\r  filled {filled:>8} of {}", args.replay_messages);
        }
        let n = 1000.min(args.replay_messages - filled);
        let batch: Vec<Value> = (0..n).map(|i| json!({ "address": own, "payload": { "i": filled + i, "pad": "x".repeat(64) } })).collect();
        http.json(
            "POST",
            "/server/enqueue?wait=true",
            Some(&Value::Array(batch)),
        )
        .await?;
        filled += n;
    }
    let before = node_rss(&mut http).await?;
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, url, key) = (
            peak.clone(),
            done.clone(),
            args.url.clone(),
            args.api_key.clone(),
        );
        tokio::spawn(async move {
            let mut http = Http::connect(&url, key).await?;
            while !done.load(Ordering::Relaxed) {
                let r = node_rss(&mut http).await?;
                peak.fetch_max(r, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, ClientError>(())
        })
    };
    let started = Instant::now();
    let auth = json!({ "clientId": id, "resumeToken": session["resumeToken"] });
    let mut s = Socket::connect(&args.url, &auth).await?;
    let mut n = 0u64;
    let mut last = 0;
    loop {
        match s.next().await? {
            Event::Signal(raw) => {
                let v = json_u64(&raw, "version").unwrap_or(0);
                if v != last + 1 {
                    return Err(ClientError::Socket(format!(
                        "replay out of order: {v} after {last}"
                    )));
                }
                last = v;
                n += 1;
            }
            Event::Other(name, _) if name == "synced" => break,
            Event::Other(..) => {}
        }
    }
    let secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    sampler
        .await
        .map_err(|e| ClientError::Http(e.to_string()))??;
    s.close().await;
    let grew = peak.load(Ordering::Relaxed).saturating_sub(before);
    Ok(format!(
        "replay  messages={n}: {:.0} messages/s ({secs:.2} s to synced), node memory grew {:.1} MiB (peak over before)",
        n as f64 / secs,
        grew as f64 / (1024.0 * 1024.0)
    ))
}

async fn idle(args: &BenchArgs) -> Res<String> {
    let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
    // Warm up allocator pools with a small batch first, so the figure is per connection.
    let warm = clients(args, 100, None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = node_rss(&mut http).await?;
    let socks = clients(args, args.idle_connections, None).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A connection of its own: the node closes an HTTP connection idle past its read timeout,
    // and opening the clients can take longer than that.
    let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
    let after = node_rss(&mut http).await?;
    let per = after.saturating_sub(before) as f64 / args.idle_connections as f64;
    let count = socks.len();
    for s in socks.into_iter().chain(warm) {
        s.close().await;
    }
    Ok(format!(
        "idle    connections={count}: {:.2} KiB of node memory per idle connection ({:.1} MiB → {:.1} MiB)",
        per / 1024.0,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    ))
}

/// Binds `--workers` clients to a fresh work address (weights 1, 2, 3, …), sends it
/// `--work-messages`, each worker acking what it is given at once; then checks that each
/// version was given once, to one worker, and is `done` in the mailbox.
async fn work(args: &BenchArgs) -> Res<String> {
    use std::sync::Mutex;
    let address = format!("work:bench-{}", tag());
    let n = args.work_messages;
    let mut socks = clients(args, args.workers.max(1), None).await?;
    let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
    let weights: Vec<u64> = (0..socks.len()).map(|i| 1 + (i % 3) as u64).collect();
    for (s, w) in socks.iter_mut().zip(&weights) {
        let id = s.session["clientId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let bind = json!({ "client": id, "addresses": [address], "weight": w });
        http.json("POST", "/server/connect", Some(&bind)).await?;
        while !matches!(s.next().await?, Event::Other(name, _) if name == "bound") {}
    }
    // Times each version was given, to anyone.
    let given = Arc::new(Mutex::new(vec![0u8; n + 1]));
    let received = Arc::new(AtomicU64::new(0));
    let all_in = Arc::new(tokio::sync::Notify::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for mut s in socks {
        let (given, received, all_in) = (given.clone(), received.clone(), all_in.clone());
        let (address, mut stopped) = (address.clone(), stopped.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = 0u64;
            loop {
                let e = tokio::select! {
                    e = s.next() => e?,
                    _ = stopped.changed() => break,
                };
                let raw = match e {
                    Event::Signal(raw) => raw,
                    Event::Other(name, data) => {
                        eprintln!("  a worker was sent {name}: {data}");
                        continue;
                    }
                };
                let v = json_u64(&raw, "version").unwrap_or(0) as usize;
                if let Some(c) = given.lock().unwrap().get_mut(v) {
                    *c = c.saturating_add(1);
                }
                s.emit(
                    "ack",
                    &format!(r#"{{"address":"{address}","version":{v}}}"#),
                )
                .await?;
                mine += 1;
                if received.fetch_add(1, Ordering::Relaxed) + 1 >= n as u64 {
                    all_in.notify_one();
                }
            }
            s.close().await;
            Ok::<_, ClientError>(mine)
        }));
    }
    let started = Instant::now();
    send_batches(&mut http, &address, n).await?;
    let sent_in = started.elapsed().as_secs_f64();
    let waited = tokio::time::timeout(Duration::from_secs(60), all_in.notified()).await;
    let secs = started.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    // A moment for a version given twice to show before the count is read.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop.send(true);
    let mut per_worker = Vec::new();
    for t in tasks {
        per_worker.push(t.await.map_err(|e| ClientError::Socket(e.to_string()))??);
    }
    let mut problems = Vec::new();
    if waited.is_err() {
        problems.push(format!("only {got} of {n} given within 60 s"));
    }
    {
        let given = given.lock().unwrap();
        let twice = given[1..].iter().filter(|c| **c > 1).count();
        let never = given[1..].iter().filter(|c| **c == 0).count();
        if twice > 0 {
            problems.push(format!("{twice} given more than once"));
        }
        if never > 0 {
            problems.push(format!("{never} never given"));
        }
    }
    // Every version done in the mailbox (the acks were taken), read a page at a time.
    let mut done = 0usize;
    let mut after = 0u64;
    loop {
        let page = http
            .json(
                "GET",
                &format!("/server/mailbox/{address}?after={after}&limit=1000"),
                None,
            )
            .await?;
        let msgs = page["messages"].as_array().cloned().unwrap_or_default();
        if msgs.is_empty() {
            break;
        }
        for m in &msgs {
            after = m["version"].as_u64().unwrap_or(after);
            done += (m["state"] == "done") as usize;
        }
    }
    if done != n {
        problems.push(format!("{} of {n} not done", n - done));
    }
    // Each worker's share of what it got, against its weight's share.
    let total_w: u64 = weights.iter().sum();
    let worst = per_worker
        .iter()
        .zip(&weights)
        .map(|(got, w)| {
            let want = *w as f64 / total_w as f64;
            ((*got as f64 / n as f64) - want).abs() / want
        })
        .fold(0.0, f64::max);
    let split: Vec<String> = weights
        .iter()
        .zip(&per_worker)
        .map(|(w, got)| format!("{w}:{got}"))
        .collect();
    eprintln!("  per worker (weight:messages): {}", split.join(" "));
    let check = if problems.is_empty() {
        "each given once, to one worker, and done".to_string()
    } else {
        format!("⚠ {}", problems.join("; "))
    };
    Ok(format!(
        "work    workers={} messages={n}: {:.0} msg/s dealt and acked ({got} in {secs:.2} s; sent in {sent_in:.2} s); shares within {:.1} % of the weights'; {check}",
        weights.len(),
        got as f64 / secs,
        worst * 100.0
    ))
}

/// A value from the node's `/metrics` (`None` when the node does not report it yet).
/// The cumulative buckets `(le, count)` of the hand-off histogram for `route`, summed over
/// `nodes`' `/metrics`.
async fn handoff_buckets(
    nodes: &[String],
    api_key: &Option<String>,
    route: &str,
) -> Res<Vec<(f64, f64)>> {
    let prefix = format!(
        "{}_bucket{{route=\"{route}\",le=\"",
        signalpost::metrics::HANDOFF
    );
    let mut sum: Vec<(f64, f64)> = Vec::new();
    for url in nodes {
        let mut http = Http::connect(url, api_key.clone()).await?;
        let (_, body) = http.call("GET", "/metrics", None).await?;
        let text = String::from_utf8_lossy(&body);
        let mut i = 0;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(prefix.as_str()) else {
                continue;
            };
            let Some((le, count)) = rest.split_once("\"} ") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            let count: f64 = count.trim().parse().unwrap_or(0.0);
            match sum.get_mut(i) {
                Some(b) => b.1 += count,
                None => sum.push((le, count)),
            }
            i += 1;
        }
    }
    Ok(sum)
}

/// The `q` quantile of cumulative buckets (the difference of two snapshots), interpolated
/// linearly within its bucket; None without observations.
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .enumerate()
        .map(|(i, (le, n))| (*le, n - before.get(i).map_or(0.0, |b| b.1)))
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in &counts {
        if n >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = if n > lower.1 {
                (rank - lower.1) / (n - lower.1)
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, n);
    }
    None
}

async fn metric(http: &mut Http, name: &str) -> Res<Option<f64>> {
    let (_, body) = http.call("GET", "/metrics", None).await?;
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| rest.strip_prefix(' '))
        .find_map(|v| v.trim().parse::<f64>().ok()))
}

/// A counter from the node's `/metrics`, 0 before its first increment.
async fn counter(http: &mut Http, name: &str) -> Res<f64> {
    Ok(metric(http, name).await?.unwrap_or(0.0))
}

async fn durable(args: &BenchArgs) -> Res<String> {
    let n = args.durable_messages;
    let run = tag();
    let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
    let appends0 = counter(&mut http, "signalpost_appends_total").await?;
    let batches0 = counter(&mut http, "signalpost_append_batch_size_count").await?;
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let per_conn = n.div_ceil(args.http_connections.max(1));
    let mut tasks = Vec::new();
    for c in 0..args.http_connections.max(1) {
        let mut http = Http::connect(&args.url, args.api_key.clone()).await?;
        let (sent, run) = (sent.clone(), run.clone());
        let (addresses, batch) = (args.addresses, args.batch.max(1));
        let range = (c * per_conn)..((c + 1) * per_conn).min(n);
        tasks.push(tokio::spawn(async move {
            let mut i = range.start;
            while i < range.end {
                let k = batch.min(range.end - i);
                let mut body = String::with_capacity(k * 80 + 2);
                body.push('[');
                for j in i..i + k {
                    if j > i {
                        body.push(',');
                    }
                    body.push_str(&format!(
                        "{{\"address\":\"channel:durable-{run}-{}\",\"payload\":{{\"n\":{j}}}}}",
                        j % addresses
                    ));
                }
                body.push(']');
                enqueue_raw(&mut http, body).await?;
                sent.fetch_add(k as u64, Ordering::Relaxed);
                i += k;
            }
            Ok::<_, ClientError>(())
        }));
    }
    let mut appended = 0.0;
    let mut last_change = Instant::now();
    while appended < n as f64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counter(&mut http, "signalpost_appends_total").await? - appends0;
        if now > appended {
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(30) {
            return Err(ClientError::Http(format!(
                "durable: only {now} of {n} appended after 30 s without progress"
            )));
        }
        appended = now;
        eprint!(
            "\r  {:>5.1} s  {:>8} enqueued  {:>8} appended",
            started.elapsed().as_secs_f64(),
            sent.load(Ordering::Relaxed),
            appended as u64
        );
    }
    let node_secs = started.elapsed().as_secs_f64();
    eprintln!();
    for t in tasks {
        t.await.map_err(|e| ClientError::Http(e.to_string()))??;
    }
    let batches = counter(&mut http, "signalpost_append_batch_size_count").await? - batches0;
    let mean_batch = ((n as f64 / batches.max(1.0)).round() as usize).max(1);
    let node_rate = n as f64 / node_secs;
    #[cfg_attr(not(feature = "cluster"), allow(unused_mut))]
    let mut line = format!(
        "durable messages={n} addresses={}: node {node_rate:.0} messages/s durably appended (mean append batch {mean_batch})",
        args.addresses
    );
    if let Some(cp) = &args.cassandra {
        #[cfg(feature = "cluster")]
        {
            eprintln!("durable: the same rows straight into Cassandra, batches of {mean_batch} …");
            let raw_rate = raw_rows(args, cp, &run, mean_batch).await?;
            line.push_str(&format!(
                "; raw same rows {raw_rate:.0} messages/s; ratio {:.2}",
                node_rate / raw_rate
            ));
        }
        #[cfg(not(feature = "cluster"))]
        {
            let _ = (cp, &run);
            return Err(ClientError::Input(
                "--cassandra needs a build with the cluster backend (--features cluster)".into(),
            ));
        }
    }
    Ok(line)
}

/// Writes the rows of the durable scenario's messages straight into Cassandra, as the node's
/// mailbox would, without reads or fence (`CassandraMailbox::write_unfenced`).
#[cfg(feature = "cluster")]
async fn raw_rows(args: &BenchArgs, contact_points: &str, run: &str, batch: usize) -> Res<f64> {
    use signalpost::mailbox::cassandra::{CassandraMailbox, DEFAULT_BUCKET_SIZE, MailboxSettings};
    let err = |e: &dyn std::fmt::Display| ClientError::Http(format!("cassandra: {e}"));
    let session = signalpost::cassandra::connect(contact_points, Some(&args.keyspace))
        .await
        .map_err(|e| err(&e))?;
    let m = CassandraMailbox::new(
        Arc::new(session),
        &MailboxSettings {
            keyspace: args.keyspace.clone(),
            retention_ms: 30 * 24 * 3600 * 1000,
            bucket_size: DEFAULT_BUCKET_SIZE,
            shards: 0,
            scope: "bench-raw".into(),
            owner: "bench".into(),
        },
    )
    .await
    .map_err(|e| err(&e))?;
    let n = args.durable_messages;
    let mut counters = std::collections::HashMap::new();
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let k = batch.min(n - i);
        let msgs = (i..i + k)
            .map(|j| {
                let address = signalpost::address::Address::parse(&format!(
                    "channel:raw-{run}-{}",
                    j % args.addresses
                ))
                .expect("a valid address");
                signalpost::mailbox::NewMessage {
                    address,
                    id: signalpost::address::MessageId::generate(),
                    payload: serde_json::value::RawValue::from_string(format!("{{\"n\":{j}}}"))
                        .expect("valid JSON"),
                    new_id: true,
                }
            })
            .collect();
        m.write_unfenced(msgs, &mut counters)
            .await
            .map_err(|e| err(&e))?;
        i += k;
        eprint!("\r  {i:>8} written");
    }
    eprintln!();
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The Cassandra session of a scenario that drives the node's own store code (`--cassandra`).
#[cfg(feature = "cluster")]
async fn store_session(
    args: &BenchArgs,
    scenario: &str,
) -> Res<Arc<scylla::client::session::Session>> {
    let Some(cp) = &args.cassandra else {
        return Err(ClientError::Input(format!(
            "the {scenario} scenario needs --cassandra <contact points>"
        )));
    };
    signalpost::cassandra::connect(cp, Some(&args.keyspace))
        .await
        .map(Arc::new)
        .map_err(|e| ClientError::Http(format!("cassandra: {e}")))
}

/// What a scenario that needs the cluster backend answers in a build without it.
#[cfg(not(feature = "cluster"))]
fn needs_cluster(scenario: &str) -> ClientError {
    ClientError::Input(format!(
        "the {scenario} scenario needs a build with the cluster backend (--features cluster)"
    ))
}

/// Joins `--members` clients (one connection each, 64 at a time) to one presence address of the
/// node's keyspace, straight through the node's own Cassandra presence code, then reads the
/// member list and makes them all leave.
#[cfg(feature = "cluster")]
async fn presence(args: &BenchArgs) -> Res<String> {
    use signalpost::address::{Address, ClientId};
    use signalpost::presence::{Member, Presence, cassandra::CassandraPresence};
    let err = |e: &dyn std::fmt::Display| ClientError::Http(format!("cassandra: {e}"));
    let session = store_session(args, "presence").await?;
    let p = Arc::new(
        CassandraPresence::new(session, &args.keyspace)
            .await
            .map_err(|e| err(&e))?,
    );
    let run = tag();
    let room = Address::parse(&format!("presence:bench-{run}")).expect("a valid address");
    let n = args.members;
    let block = 10_000.min(n);
    let client = |i: usize| ClientId::parse(&format!("m{i:07}-{run}")).expect("a valid id");
    let started = Instant::now();
    let joins = each(n, |i| {
        let (p, room) = (p.clone(), room.clone());
        async move {
            let m = Member {
                client: client(i),
                user: None,
            };
            match p.join(&room, &m, "bench", &format!("c{i}")).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(ClientError::Http(format!("join {i} was not the first"))),
                Err(e) => Err(err(&e)),
            }
        }
    })
    .await?;
    let join_rate = n as f64 / started.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut listed = 0;
    let mut after: Option<ClientId> = None;
    loop {
        let page = p
            .members(&room, after.as_ref(), 10_000)
            .await
            .map_err(|e| err(&e))?;
        let Some(last) = page.last() else { break };
        after = Some(last.client.clone());
        listed += page.len();
    }
    let list_ms = t.elapsed().as_secs_f64() * 1000.0;
    if listed != n {
        return Err(ClientError::Http(format!("listed {listed} of {n} members")));
    }
    let leaves = each(n, |i| {
        let (p, room) = (p.clone(), room.clone());
        async move {
            match p.leave(&room, &client(i), "bench", &format!("c{i}")).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(ClientError::Http(format!("leave {i} was not the last"))),
                Err(e) => Err(err(&e)),
            }
        }
    })
    .await?;
    let (first, last) = (&joins[..block], &joins[n - block..]);
    let (lfirst, llast) = (&leaves[..block], &leaves[n - block..]);
    Ok(format!(
        "presence members={n}: {join_rate:.0} joins/s (64 at a time); join p50/p99 first {block} {:.2}/{:.2} ms, last {block} {:.2}/{:.2} ms; leave p50/p99 first {:.2}/{:.2} ms, last {:.2}/{:.2} ms; the whole member list read in {list_ms:.0} ms",
        q(first, 0.5),
        q(first, 0.99),
        q(last, 0.5),
        q(last, 0.99),
        q(lfirst, 0.5),
        q(lfirst, 0.99),
        q(llast, 0.5),
        q(llast, 0.99),
    ))
}

#[cfg(not(feature = "cluster"))]
async fn presence(_: &BenchArgs) -> Res<String> {
    Err(needs_cluster("presence"))
}

#[cfg(feature = "cluster")]
/// Runs op `i` for i in 0..n, 64 at a time; each op's latency (µs), by op index.
async fn each<F, Fut>(n: usize, f: F) -> Res<Vec<u64>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Res<()>>,
{
    let mut lat = vec![0u64; n];
    use futures_util::StreamExt;
    let mut ops = futures_util::stream::iter(0..n)
        .map(|i| {
            let fut = f(i);
            async move {
                let t = Instant::now();
                fut.await?;
                Ok::<_, ClientError>((i, t.elapsed().as_micros() as u64))
            }
        })
        .buffer_unordered(64);
    let mut done = 0;
    while let Some(r) = ops.next().await {
        let (i, us) = r?;
        lat[i] = us;
        done += 1;
        if done % 1000 == 0 {
            eprint!("\r  {done:>8}");
        }
    }
    eprintln!();
    Ok(lat)
}

/// The `q` quantile of latencies in µs, in ms.
#[cfg(feature = "cluster")]
fn q(lat: &[u64], q: f64) -> f64 {
    let mut h = Histogram::<u64>::new(3).expect("a histogram");
    for v in lat {
        let _ = h.record(*v);
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Binds, reads and unbinds `--bind-clients` clients (one address each) straight in Cassandra,
/// once with the layout of bindings before schema file 10 and once with `client_bindings`.
#[cfg(feature = "cluster")]
async fn bindings(args: &BenchArgs) -> Res<String> {
    use signalpost::address::{Address, ClientId};
    use signalpost::topology::cassandra::{CassandraTopology, Layout};
    use signalpost::topology::{Binding, Topology};
    let err = |e: &dyn std::fmt::Display| ClientError::Http(format!("cassandra: {e}"));
    let session = store_session(args, "bindings").await?;
    let n = args.bind_clients;
    let mut parts = Vec::new();
    for layout in [Layout::Legacy, Layout::Rows] {
        let t = Arc::new(
            CassandraTopology::with_layout(session.clone(), &args.keyspace, layout)
                .await
                .map_err(|e| err(&e))?,
        );
        let run = tag();
        let client = |i: usize| ClientId::parse(&format!("b{i:07}-{run}")).expect("an id");
        let address = |i: usize| {
            Address::parse(&format!("channel:bench-{run}-{}", i % 1000)).expect("an address")
        };
        let started = Instant::now();
        let binds = each(n, |i| {
            let t = t.clone();
            let b = Binding {
                address: address(i),
                since: 0,
            };
            async move {
                match t.add(&client(i), &[b], usize::MAX).await {
                    Ok(new) if new.len() == 1 => Ok(()),
                    Ok(_) => Err(ClientError::Http(format!("bind {i} was not new"))),
                    Err(e) => Err(err(&e)),
                }
            }
        })
        .await?;
        let bind_rate = n as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        let gets = each(n, |i| {
            let t = t.clone();
            async move {
                match t.get(&client(i)).await {
                    Ok(b) if b.len() == 1 => Ok(()),
                    Ok(b) => Err(ClientError::Http(format!("get {i}: {} bindings", b.len()))),
                    Err(e) => Err(err(&e)),
                }
            }
        })
        .await?;
        let get_rate = n as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        let unbinds = each(n, |i| {
            let t = t.clone();
            async move {
                match t.remove(&client(i), &[address(i)]).await {
                    Ok(gone) if gone.len() == 1 => Ok(()),
                    Ok(_) => Err(ClientError::Http(format!("unbind {i} was not bound"))),
                    Err(e) => Err(err(&e)),
                }
            }
        })
        .await?;
        let unbind_rate = n as f64 / started.elapsed().as_secs_f64();
        parts.push(format!(
            "{layout:?}: bind {bind_rate:.0}/s p50/p99 {:.2}/{:.2} ms, get {get_rate:.0}/s {:.2}/{:.2} ms, unbind {unbind_rate:.0}/s {:.2}/{:.2} ms",
            q(&binds, 0.5),
            q(&binds, 0.99),
            q(&gets, 0.5),
            q(&gets, 0.99),
            q(&unbinds, 0.5),
            q(&unbinds, 0.99),
        ));
    }
    Ok(format!(
        "bindings clients={n} (64 at a time): {}",
        parts.join("; ")
    ))
}

#[cfg(not(feature = "cluster"))]
async fn bindings(_: &BenchArgs) -> Res<String> {
    Err(needs_cluster("bindings"))
}

#[cfg(test)]
mod tests {
    use super::{bucket_quantile, write_trace};

    #[test]
    fn a_trace_lists_answers_and_deliveries_in_send_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.csv");
        write_trace(&path, &[(30, 4), (10, 2)], &[(10, 7), (20, 9)]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "kind,sent_us,took_us\nanswer,10,2\ndelivery,10,7\ndelivery,20,9\nanswer,30,4\n"
        );
        let missing = dir.path().join("no/such/dir/trace.csv");
        assert!(write_trace(&missing, &[], &[]).is_err());
    }

    #[test]
    fn quantiles_from_bucket_snapshots() {
        let before = [(0.001, 10.0), (0.002, 10.0), (f64::INFINITY, 10.0)];
        // 100 new observations: 50 under 1 ms, 40 in (1, 2] ms, 10 above 2 ms.
        let after = [(0.001, 60.0), (0.002, 100.0), (f64::INFINITY, 110.0)];
        let p50 = bucket_quantile(&before, &after, 0.5).unwrap();
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        let p70 = bucket_quantile(&before, &after, 0.7).unwrap();
        assert!((p70 - 0.0015).abs() < 1e-9, "{p70}");
        // Past the last finite bucket: its bound (a lower limit).
        assert_eq!(bucket_quantile(&before, &after, 0.99), Some(0.002));
        assert_eq!(
            bucket_quantile(&after, &after, 0.5),
            None,
            "no observations"
        );
    }
}
