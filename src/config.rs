//! One typed configuration, layered: defaults < TOML file (`--config`) < `SIGNALPOST_*`
//! environment < command-line flags.
//!
//! The layers meet as one JSON tree (the defaults serialized, then each layer's keys laid over
//! it) that is deserialized into [`Config`] once, so a wrong type or an unknown key is reported
//! with its path and the layer that set it. An environment value is read by the type of its
//! key's default: a number, a boolean, a list (JSON, or comma-separated) or a string.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Shortest accepted secret (client token, resume and cluster secrets), in bytes.
pub const MIN_SECRET: usize = 32;
/// Shortest accepted API key, in bytes.
pub const MIN_API_KEY: usize = 16;

/// Which backends a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Embedded store and in-process queue; no outside service.
    Embedded,
    /// Cassandra, Kafka and ZooKeeper.
    Cluster,
}

/// Everything a node can be configured with. Field names are the TOML keys, and each backend and
/// concern has its own section (`[limits]`, `[tls]`, `[cassandra]`, `[kafka]`, `[zookeeper]`).
/// The environment variable is `SIGNALPOST_` + the key's flat name in capitals (the section's
/// key, prefixed for the backends): e.g. `SIGNALPOST_API_KEY`, `SIGNALPOST_MAX_CONNECTIONS`
/// (`limits.max_connections`), `SIGNALPOST_KAFKA` (`kafka.brokers`), `SIGNALPOST_KAFKA_GROUP`
/// (`kafka.group`), `SIGNALPOST_TLS_CERT` (`tls.cert`); [`ENV_NAMES`] is the whole table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the node listens (HTTP API, Socket.IO and the page).
    pub listen: SocketAddr,
    /// Where the embedded backend keeps its files, and where generated secrets are kept.
    pub data_dir: PathBuf,
    pub backend: Backend,
    /// This node's id in the cluster (default: generated and kept in the data dir).
    pub node_id: Option<String>,
    /// The URL other nodes (and the console) reach this node at, registered in the cluster
    /// (default: `http://<listen address>`; set it when listening on 0.0.0.0 or behind NAT).
    pub advertise_url: Option<String>,
    /// How long messages are kept, in seconds (default 30 days).
    pub retention_secs: u64,
    /// How often the expiry task runs, in milliseconds.
    pub expiry_interval_ms: u64,
    /// When set, every `/server/*` call needs `Authorization: Bearer <api_key>` (at least 16 bytes).
    pub api_key: Option<String>,
    /// Start on a non-loopback `listen` address without an `api_key` (refused otherwise).
    pub insecure: bool,
    /// The secret nodes of a cluster prove to each other (HMAC of every node-to-node request);
    /// required by the cluster backend, at least 32 bytes.
    pub cluster_secret: Option<String>,
    /// HS256 secret for client JWTs (`auth.token`), at least 32 bytes. When set, tokens that
    /// are given are checked.
    pub client_token_secret: Option<String>,
    /// A PEM file with the RS256 or ES256 public key of client JWTs (instead of the HS256 secret).
    pub client_token_public_key: Option<PathBuf>,
    /// Refuse connections without a valid client JWT (needs `client_token_secret`).
    pub require_client_token: bool,
    /// Secret for resume tokens (default: generated and kept in the data dir).
    pub resume_secret: Option<String>,
    /// Origins whose pages may connect (CORS on the Socket.IO endpoint): a list, or `["*"]`.
    pub cors_origins: Vec<String>,
    /// Messages read from the mailbox per replay page.
    pub replay_page: usize,
    /// How often the node pings each Socket.IO connection (Engine.IO `pingInterval`), in ms.
    pub ping_interval_ms: u64,
    /// How long a connection may take to answer a ping before it is closed (`pingTimeout`), in
    /// ms; shorter than `ping_interval_ms`.
    pub ping_timeout_ms: u64,
    /// How long a client may hold a message of a `work:` address without acking it before it
    /// goes to another client, in ms.
    pub work_ack_timeout_ms: u64,
    /// Most messages of one `work:` address one client holds (sent, not acked) at once, per
    /// unit of its binding's weight.
    pub work_in_flight: usize,
    /// Bytes of appended `work:` messages the node keeps in memory for dealing, all its work
    /// addresses together (a message counts its signal's length and 160 bytes); past it,
    /// messages are read back from the store when dealt. 0: none kept.
    pub work_at_hand_bytes: usize,
    /// Most messages appended in one storage batch.
    pub append_batch: usize,
    /// Threads that run connections, requests and deliveries (the async runtime's workers);
    /// 0 picks one per core. The embedded store's applier has a thread of its own besides
    /// these, and large log writes go to the runtime's blocking pool.
    pub workers: usize,
    /// What one node, one client and one request may use.
    pub limits: Limits,
    /// HTTPS and WSS.
    pub tls: Tls,
    /// The embedded backend's store.
    pub embedded: EmbeddedConfig,
    /// `--backend cluster`: the Cassandra store.
    pub cassandra: CassandraConfig,
    /// `--backend cluster`: the Kafka queue.
    pub kafka: KafkaConfig,
    /// `--backend cluster`: membership, leader, locks.
    pub zookeeper: ZookeeperConfig,
}

/// `[limits]`: what one node, one client and one request may use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest payload, in bytes of JSON.
    pub max_payload_bytes: usize,
    /// Most messages in one `POST /server/enqueue` batch, and most addresses in one bind.
    pub max_batch: usize,
    /// Most Socket.IO connections this node accepts.
    pub max_connections: usize,
    /// Most HTTP connections open at once (Socket.IO connections included); more wait in the
    /// kernel's accept queue.
    pub max_http_connections: usize,
    /// Largest HTTP request body, in bytes (refused with 413 while it is read).
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers, and each chunk of its body.
    pub http_read_timeout_ms: u64,
    /// Most bindings one client may hold (a bind past it is refused with the reason).
    pub max_bindings_per_client: usize,
    /// Most Socket.IO connections of one user (JWT `sub`) in the cluster; the oldest is kicked
    /// when one more connects. 0: no quota.
    pub max_connections_per_user: usize,
    /// Socket.IO handshakes accepted per client IP address per second (0: no limit).
    pub connect_rate_per_ip: u32,
    /// Events a connection may send per second (acks, refresh, …); past it they are refused
    /// with an `error` event, and a connection that keeps flooding is closed (0: no limit).
    pub event_rate_per_connection: u32,
}

/// `[tls]`: with `cert` and `key` the listener speaks HTTPS and WSS only.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM certificates a node trusts when it calls other nodes over HTTPS (default: `cert`,
    /// which works when it holds the CA or every node shares it).
    pub ca: Option<PathBuf>,
}

/// `[embedded]`: the redb files in the data dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Memory redb may use to cache the mailbox file's pages, in MiB (the state file gets a
    /// quarter of it): the store's share of the node's memory, whatever the files' size.
    pub cache_mb: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self { cache_mb: 256 }
    }
}

/// `[cassandra]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CassandraConfig {
    /// Contact points, comma-separated.
    pub contact_points: String,
    pub keyspace: String,
    /// CQL replication map, e.g. `{'class': 'SimpleStrategy', 'replication_factor': 1}`.
    pub replication: String,
}

/// `[kafka]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Prefix of the topic names (`signals.` gives `signals.enqueue`, …).
    pub topic_prefix: String,
    /// The consumer group the nodes share.
    pub group: String,
    /// Partitions of the topics a node creates when they are missing.
    pub partitions: i32,
}

/// `[zookeeper]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZookeeperConfig {
    /// Connect string.
    pub connect: String,
    pub session_timeout_ms: u64,
    /// The path under which the nodes register and elect a leader.
    pub root: String,
    /// How long a node waits for a cluster-wide lock (e.g. the startup lock around topic and
    /// schema creation) before failing with a clear error.
    pub lock_timeout_ms: u64,
}

/// The environment's flat names (after `SIGNALPOST_`, lower case) of the keys in sections.
/// A key outside a section has its own name (`api_key`).
pub const ENV_NAMES: &[(&str, &str)] = &[
    ("max_payload_bytes", "limits.max_payload_bytes"),
    ("max_batch", "limits.max_batch"),
    ("max_connections", "limits.max_connections"),
    ("max_http_connections", "limits.max_http_connections"),
    ("max_body_bytes", "limits.max_body_bytes"),
    ("http_read_timeout_ms", "limits.http_read_timeout_ms"),
    ("max_bindings_per_client", "limits.max_bindings_per_client"),
    (
        "max_connections_per_user",
        "limits.max_connections_per_user",
    ),
    ("connect_rate_per_ip", "limits.connect_rate_per_ip"),
    (
        "event_rate_per_connection",
        "limits.event_rate_per_connection",
    ),
    ("tls_cert", "tls.cert"),
    ("tls_key", "tls.key"),
    ("tls_ca", "tls.ca"),
    ("store_cache_mb", "embedded.cache_mb"),
    ("cassandra", "cassandra.contact_points"),
    ("cassandra_keyspace", "cassandra.keyspace"),
    ("cassandra_replication", "cassandra.replication"),
    ("kafka", "kafka.brokers"),
    ("kafka_topic_prefix", "kafka.topic_prefix"),
    ("kafka_group", "kafka.group"),
    ("kafka_partitions", "kafka.partitions"),
    ("zookeeper", "zookeeper.connect"),
    (
        "zookeeper_session_timeout_ms",
        "zookeeper.session_timeout_ms",
    ),
    ("zookeeper_root", "zookeeper.root"),
    ("zookeeper_lock_timeout_ms", "zookeeper.lock_timeout_ms"),
];

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid default"),
            data_dir: PathBuf::from("./data"),
            backend: Backend::Embedded,
            node_id: None,
            advertise_url: None,
            retention_secs: 30 * 24 * 3600,
            expiry_interval_ms: 60_000,
            api_key: None,
            insecure: false,
            cluster_secret: None,
            client_token_secret: None,
            client_token_public_key: None,
            require_client_token: false,
            resume_secret: None,
            cors_origins: Vec::new(),
            replay_page: 512,
            ping_interval_ms: 25_000,
            ping_timeout_ms: 20_000,
            work_ack_timeout_ms: 30_000,
            work_in_flight: 32,
            work_at_hand_bytes: 64 << 20,
            append_batch: 4096,
            workers: 0,
            limits: Limits::default(),
            tls: Tls::default(),
            embedded: EmbeddedConfig::default(),
            cassandra: CassandraConfig::default(),
            kafka: KafkaConfig::default(),
            zookeeper: ZookeeperConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            max_batch: 1000,
            max_connections: 100_000,
            max_http_connections: 110_000,
            max_body_bytes: 4 << 20,
            http_read_timeout_ms: 10_000,
            max_bindings_per_client: 1000,
            max_connections_per_user: 0,
            connect_rate_per_ip: 1000,
            event_rate_per_connection: 1000,
        }
    }
}

impl Default for CassandraConfig {
    fn default() -> Self {
        Self {
            contact_points: "127.0.0.1:9042".into(),
            keyspace: "signalpost".into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "signals.".into(),
            group: "signalpost".into(),
            partitions: 8,
        }
    }
}

impl Default for ZookeeperConfig {
    fn default() -> Self {
        Self {
            connect: "127.0.0.1:2181".into(),
            session_timeout_ms: 6000,
            root: "/signalpost".into(),
            lock_timeout_ms: 60_000,
        }
    }
}

/// Configuration failures (bad file, bad variable, impossible combination).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration: {} is not valid TOML", path.display())]
    Toml {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value of the wrong type or an unknown key: its path and the layer that set it.
    #[error("configuration: {key} (set by {from}) is not valid")]
    Value {
        key: String,
        from: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Most runtime worker threads a node may be given (`workers`).
const MAX_WORKERS: usize = 1024;

/// The values given as flags; only those set override the other layers.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
}

impl Config {
    /// Loads defaults < `file` < environment < `flags`, then checks the result.
    pub fn load(file: Option<&Path>, flags: &Overrides) -> Result<Self, ConfigError> {
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        Self::load_from(file, flags, env)
    }

    /// [`Config::load`] with the environment given (`(name, value)` pairs; names without the
    /// `SIGNALPOST_` prefix, and those that name no setting, are ignored).
    pub fn load_from(
        file: Option<&Path>,
        flags: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let defaults = serde_json::to_value(Config::default()).expect("the defaults serialize");
        let mut tree = defaults.clone();
        // Which layer set each key (its path with dots), for the error that names it.
        let mut set_by: Vec<(String, String)> = Vec::new();
        if let Some(f) = file {
            let text = std::fs::read_to_string(f).map_err(|source| ConfigError::Read {
                path: f.to_owned(),
                source,
            })?;
            let layer: Value = toml::from_str(&text).map_err(|e| ConfigError::Toml {
                path: f.to_owned(),
                source: Box::new(e),
            })?;
            let from = format!("{}", f.display());
            overlay(&mut tree, layer, "", &mut |key| {
                set_by.push((key, from.clone()))
            });
        }
        for (name, raw) in env {
            let Some(flat) = name.strip_prefix("SIGNALPOST_") else {
                continue;
            };
            let flat = flat.to_ascii_lowercase();
            // Only the SIGNALPOST_* variables that name a setting (SIGNALPOST_URL and friends
            // belong to the tools); a flat name of a key in a section goes to its section.
            let key = match ENV_NAMES.iter().find(|(n, _)| *n == flat) {
                Some((_, path)) => (*path).to_owned(),
                None if defaults.get(&flat).is_some_and(|v| !v.is_object()) => flat,
                None => continue,
            };
            let (section, field) = key
                .split_once('.')
                .map_or((None, key.as_str()), |(s, f)| (Some(s), f));
            // Read as its key's default is typed, whatever an earlier layer put there.
            let value = env_value(
                match section {
                    Some(s) => &defaults[s][field],
                    None => &defaults[field],
                },
                raw,
            );
            match section {
                Some(s) => tree[s][field] = value,
                None => tree[field] = value,
            }
            set_by.push((key, name));
        }
        let flags = serde_json::to_value(flags).expect("the flags serialize");
        overlay(&mut tree, flags, "", &mut |key| {
            let flag = format!("--{}", key.replace('_', "-"));
            set_by.push((key, flag));
        });
        let cfg: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let key = e.path().to_string();
            // The last layer that set the key, or the key's section (an unknown key in it).
            let from = set_by
                .iter()
                .rev()
                .find(|(k, _)| {
                    *k == key
                        || key.starts_with(&format!("{k}."))
                        || k.starts_with(&format!("{key}."))
                })
                .map(|(_, from)| from.clone())
                // Only a file can add a key that is not a setting.
                .or_else(|| file.map(|f| f.display().to_string()))
                .unwrap_or_else(|| "the defaults".to_owned());
            ConfigError::Value {
                key,
                from,
                source: e.into_inner(),
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.retention_secs == 0 {
            return bad("retention_secs must be at least 1");
        }
        if self.require_client_token
            && self.client_token_secret.is_none()
            && self.client_token_public_key.is_none()
        {
            return bad(
                "require_client_token needs client_token_secret or client_token_public_key",
            );
        }
        if self.client_token_secret.is_some() && self.client_token_public_key.is_some() {
            return bad(
                "set client_token_secret (HS256) or client_token_public_key (RS256/ES256), not both",
            );
        }
        for (name, value, min) in [
            ("api_key", &self.api_key, MIN_API_KEY),
            ("client_token_secret", &self.client_token_secret, MIN_SECRET),
            ("resume_secret", &self.resume_secret, MIN_SECRET),
            ("cluster_secret", &self.cluster_secret, MIN_SECRET),
        ] {
            if let Some(v) = value
                && v.len() < min
            {
                return Err(ConfigError::Invalid(format!(
                    "{name} is {} bytes; it must be at least {min} (e.g. `openssl rand -hex 32`)",
                    v.len()
                )));
            }
        }
        if self.backend == Backend::Cluster && self.cluster_secret.is_none() {
            return bad(
                "the cluster backend needs cluster_secret (SIGNALPOST_CLUSTER_SECRET, the same on every node, at least 32 bytes): nodes prove it to each other",
            );
        }
        if !self.listen.ip().is_loopback() && self.api_key.is_none() && !self.insecure {
            return Err(ConfigError::Invalid(format!(
                "listening on {} (not a loopback address) without an api_key would let anyone on the network use the server API; set api_key (SIGNALPOST_API_KEY), or insecure = true (SIGNALPOST_INSECURE=true) to do it anyway",
                self.listen
            )));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad(
                "tls.cert and tls.key (SIGNALPOST_TLS_CERT, SIGNALPOST_TLS_KEY) go together",
            );
        }
        if self.limits.max_http_connections < 1
            || self.limits.max_body_bytes < 1024
            || self.limits.http_read_timeout_ms < 100
        {
            return bad(
                "max_http_connections must be positive, max_body_bytes at least 1024 and http_read_timeout_ms at least 100",
            );
        }
        for o in &self.cors_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "cors_origins: {o:?} is not an origin (scheme://host[:port]) or \"*\""
                )));
            }
        }
        if self.limits.max_payload_bytes == 0
            || self.limits.max_batch == 0
            || self.replay_page == 0
            || self.append_batch == 0
        {
            return bad(
                "max_payload_bytes, max_batch, replay_page and append_batch must be positive",
            );
        }
        if self.workers > MAX_WORKERS {
            return bad(&format!(
                "workers is {}: at most {MAX_WORKERS} (0 = one per core)",
                self.workers
            ));
        }
        if self.ping_timeout_ms == 0 || self.ping_timeout_ms >= self.ping_interval_ms {
            // Engine.IO schedules pings on a fixed clock only while each answer comes within the
            // interval; the gateway's room for the ping relies on that schedule.
            return bad("ping_timeout_ms must be positive and shorter than ping_interval_ms");
        }
        if self.work_ack_timeout_ms == 0 || self.work_in_flight == 0 {
            return bad("work_ack_timeout_ms and work_in_flight must be positive");
        }
        if self.embedded.cache_mb < 8 {
            return bad("store_cache_mb ([embedded] cache_mb) must be at least 8");
        }
        if !self.zookeeper.root.starts_with('/') || self.zookeeper.root.len() < 2 {
            return bad("zookeeper.root must be an absolute path such as /signalpost");
        }
        Ok(())
    }

    pub fn retention_ms(&self) -> u64 {
        self.retention_secs.saturating_mul(1000)
    }
}

/// Lays `layer`'s keys over `tree` (tables key by key, anything else replaced whole) and tells
/// `set` the dotted path of each value it lays.
fn overlay(tree: &mut Value, layer: Value, path: &str, set: &mut dyn FnMut(String)) {
    match (tree, layer) {
        (Value::Object(tree), Value::Object(layer)) => {
            for (k, v) in layer {
                let key = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match tree.get_mut(&k) {
                    Some(slot @ Value::Object(_)) if v.is_object() => overlay(slot, v, &key, set),
                    _ => {
                        set(key);
                        tree.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => {
            set(path.to_owned());
            *slot = v;
        }
    }
}

/// An environment value read as the type of the key's default (`default`): a number or a boolean
/// when it parses as one, a list from JSON (`["a","b"]`) or comma-separated (`a,b`), else the
/// string itself (a string that should have been a number is then refused with its key).
fn env_value(default: &Value, raw: String) -> Value {
    match default {
        Value::Number(_) => raw
            .parse::<u64>()
            .map(Value::from)
            .or_else(|_| raw.parse::<i64>().map(Value::from))
            .or_else(|_| raw.parse::<f64>().map(Value::from))
            .unwrap_or(Value::String(raw)),
        Value::Bool(_) => match raw.to_ascii_lowercase().as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(raw),
        },
        Value::Array(_) => match serde_json::from_str::<Value>(&raw) {
            Ok(list @ Value::Array(_)) => list,
            _ => Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_owned()))
                    .collect(),
            ),
        },
        _ => Value::String(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config file in a temporary folder (kept while the guard lives).
    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (format!("SIGNALPOST_{k}"), (*v).to_owned()))
            .collect()
    }

    fn load(file: Option<&Path>, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_from(file, &Overrides::default(), env(vars))
    }

    /// The error and its causes, as `main` prints them.
    fn chain(e: &dyn std::error::Error) -> String {
        match e.source() {
            Some(cause) => format!("{e}: {}", chain(cause)),
            None => e.to_string(),
        }
    }

    #[test]
    fn layers_file_then_env_then_flags() {
        let (_d, f) = file(
            "listen = \"127.0.0.1:1\"\nretention_secs = 5\napi_key = \"file-key-0123456789\"\n",
        );
        let vars = [
            ("API_KEY", "env-key-0123456789"),
            ("LISTEN", "127.0.0.1:2"),
            ("URL", "http://ignored"),
        ];
        let flags = Overrides {
            listen: Some("127.0.0.1:3".parse().unwrap()),
            ..Default::default()
        };
        let mut all = env(&vars);
        all.push(("HOME".into(), "/not-a-setting".into()));
        let c = Config::load_from(Some(&f), &flags, all).unwrap();
        assert_eq!(c.retention_secs, 5, "file beats default");
        assert_eq!(
            c.api_key.as_deref(),
            Some("env-key-0123456789"),
            "env beats file"
        );
        assert_eq!(c.listen.port(), 3, "flag beats env");
        let c = load(Some(&f), &vars).unwrap();
        assert_eq!(c.listen.port(), 2);
        let c = load(Some(&f), &[]).unwrap();
        assert_eq!(c.listen.port(), 1);
        assert_eq!(
            c.replay_page,
            Config::default().replay_page,
            "defaults stay"
        );
    }

    #[test]
    fn sections_in_the_file_and_flat_names_in_the_environment() {
        let (_d, f) = file(
            "[kafka]\nbrokers = \"k1:9092\"\ngroup = \"g-file\"\n[limits]\nmax_connections = 7\n",
        );
        let c = load(
            Some(&f),
            &[
                ("KAFKA_GROUP", "g-env"),
                ("ZOOKEEPER", "z:2181"),
                ("MAX_BATCH", "5"),
                ("TLS_CA", "/ca.pem"),
                ("INSECURE", "false"),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "k1:9092", "a section in the file");
        assert_eq!(
            c.kafka.group, "g-env",
            "a flat name in the environment beats the file"
        );
        assert_eq!(
            c.kafka.topic_prefix, "signals.",
            "the section's defaults stay"
        );
        assert_eq!(c.zookeeper.connect, "z:2181");
        assert_eq!((c.limits.max_connections, c.limits.max_batch), (7, 5));
        assert_eq!(c.tls.ca.as_deref(), Some(Path::new("/ca.pem")));
        // A key outside its section is refused with its name and the file that set it.
        let (_d, flat) = file("max_connections = 3\n");
        let e = load(Some(&flat), &[]).unwrap_err().to_string();
        assert!(e.contains("max_connections") && e.contains("c.toml"), "{e}");
        // A section's name is not a setting of the environment.
        let c = load(None, &[("KAFKA", "k2:9092"), ("LIMITS", "x")]).unwrap();
        assert_eq!(c.kafka.brokers, "k2:9092");
    }

    #[test]
    fn environment_values_take_their_key_type() {
        let c = load(
            None,
            &[
                ("CORS_ORIGINS", "https://a.example, https://b.example"),
                ("REQUIRE_CLIENT_TOKEN", "TRUE"),
                ("CLIENT_TOKEN_SECRET", "0123456789abcdef0123456789abcdef"),
                ("NODE_ID", "12345"),
                ("KAFKA_PARTITIONS", "3"),
            ],
        )
        .unwrap();
        assert_eq!(c.cors_origins, ["https://a.example", "https://b.example"]);
        assert!(c.require_client_token);
        assert_eq!(c.node_id.as_deref(), Some("12345"), "digits stay a string");
        assert_eq!(c.kafka.partitions, 3);
        // The variable beats a file's value of the wrong type, and is read by the key's type.
        let (_d, f) = file("[limits]\nmax_batch = \"lots\"\n");
        assert_eq!(
            load(Some(&f), &[("MAX_BATCH", "9")])
                .unwrap()
                .limits
                .max_batch,
            9
        );
        let c = load(None, &[("CORS_ORIGINS", r#"["https://a.example"]"#)]).unwrap();
        assert_eq!(c.cors_origins, ["https://a.example"]);
        let e = chain(&load(None, &[("MAX_CONNECTIONS", "many")]).unwrap_err());
        assert!(
            e.contains("limits.max_connections (set by SIGNALPOST_MAX_CONNECTIONS)")
                && e.contains("invalid type: string \"many\""),
            "{e}"
        );
    }

    #[test]
    fn rejects_bad_values_with_a_reason() {
        let (_d, bad) = file("retention_secs = \"soon\"\n");
        let e = chain(&load(Some(&bad), &[]).unwrap_err());
        assert!(
            e.contains("retention_secs (set by")
                && e.contains("c.toml")
                && e.contains("expected u64"),
            "{e}"
        );
        let (_d, typo) = file("listn = \"x\"\n");
        let e = chain(&load(Some(&typo), &[]).unwrap_err());
        assert!(e.contains("unknown field `listn`"), "{e}");
        let (_d, broken) = file("listen = \n");
        let e = load(Some(&broken), &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Toml { .. }), "{e}");
        let e = load(Some(Path::new("/no/such/file.toml")), &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        let e = load(None, &[("REQUIRE_CLIENT_TOKEN", "true")]).unwrap_err();
        assert!(e.to_string().contains("client_token_secret"), "{e}");
    }

    #[test]
    fn unsafe_settings_are_refused_with_the_reason() {
        let refused = |vars: &[(&str, &str)], want: &str| {
            let e = load(None, vars).unwrap_err().to_string();
            assert!(e.contains(want), "{vars:?}: {e}");
        };
        refused(&[("API_KEY", "short")], "api_key is 5 bytes");
        refused(
            &[("CLIENT_TOKEN_SECRET", "")],
            "client_token_secret is 0 bytes",
        );
        refused(&[("RESUME_SECRET", "x")], "resume_secret is 1 bytes");
        refused(&[("BACKEND", "cluster")], "needs cluster_secret");
        refused(&[("LISTEN", "0.0.0.0:0")], "not a loopback address");
        refused(&[("TLS_CERT", "/x.pem")], "go together");
        refused(&[("CORS_ORIGINS", "[\"example.com\"]")], "not an origin");
        assert!(load(None, &[("LISTEN", "0.0.0.0:0"), ("INSECURE", "true")]).is_ok());
    }

    #[test]
    fn the_work_at_hand_budget_is_a_setting() {
        let at_hand = |vars: &[(&str, &str)]| load(None, vars).unwrap().work_at_hand_bytes;
        assert_eq!(at_hand(&[]), 64 << 20);
        assert_eq!(at_hand(&[("WORK_AT_HAND_BYTES", "0")]), 0);
        assert_eq!(at_hand(&[("WORK_AT_HAND_BYTES", "1048576")]), 1 << 20);
        assert!(load(None, &[("WORK_AT_HAND_BYTES", "-1")]).is_err());
    }

    #[test]
    fn workers_zero_means_one_per_core_and_too_many_is_refused() {
        assert_eq!(load(None, &[]).unwrap().workers, 0);
        assert_eq!(load(None, &[("WORKERS", "1")]).unwrap().workers, 1);
        let e = load(None, &[("WORKERS", "5000")]).unwrap_err().to_string();
        assert!(e.contains("workers is 5000: at most 1024"), "{e}");
        assert!(load(None, &[("WORKERS", "-1")]).is_err());
    }
}
