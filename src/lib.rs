//! signalpost: a clustered signal delivery server.
//!
//! Map of the crate:
//! - [`address`]: `Address`, `ClientId`, `MessageId` — validated once at the edge;
//! - [`mailbox`]: versioned per-address mailboxes (trait + backends + contract suite);
//! - [`topology`]: bindings of clients to addresses, and acked cursors;
//! - [`presence`]: who is connected where; [`cluster`]: live nodes and the leader;
//! - [`ingest`]: the operations queue and the processor that applies them;
//! - [`routing`]: from appended messages to local connections, and the fan-out port;
//! - [`work`]: work addresses — each message to one connected client, by weight, until acked;
//! - [`peers`]: the other nodes of a cluster (interests, forwarding, its transport and routes);
//! - [`gateway`]: Socket.IO (handshake, resume, replay, live delivery, acks);
//! - [`api`]: the HTTP server API; [`console`]: the page; [`listener`]: TLS, caps, timeouts;
//! - [`node`]: builds it all from [`config`] and drains it; [`security`], [`metrics`];
//!
//! The command-line tools (`bench`, `enqueue`, …) are not part of the library: they live in the
//! binary (`src/tools/`, `src/main.rs`) and reach a node only through its public interfaces.

pub mod address;
pub mod api;
pub mod backup;
#[cfg(feature = "cluster")]
pub mod cassandra;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod console;
pub mod gateway;
pub mod ingest;
pub mod listener;
pub mod mailbox;
pub mod metrics;
pub mod node;
pub mod peers;
pub mod presence;
pub mod routing;
pub mod security;
pub mod tasks;
pub mod tls;
pub mod topology;
pub mod work;
