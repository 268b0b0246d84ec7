//! signalpost: a clustered signal delivery server.
//!
//! Map of the crate:
//! - [`address`]: `Address`, `ClientId`, `MessageId` — validated once at the edge;
//! - [`mailbox`]: versioned per-address mailboxes (trait + backends + contract suite);
//! - [`topology`]: bindings of clients to addresses, and acked cursors;
//! - [`presence`]: who is connected where; [`cluster`]: live nodes and the leader;
//! - [`ingest`]: the operations queue and the processor that applies them;
//! - [`routing`]: from appended messages to local connections;
//! - [`gateway`]: Socket.IO (handshake, resume, replay, live delivery, acks);
//! - [`api`]: the HTTP server API; [`console`]: the page; [`listener`]: TLS, caps, timeouts;
//! - [`node`]: builds it all from [`config`] and drains it; [`security`], [`metrics`];
//! - [`tools`]: the command-line clients (`bench`, …) that drive a node from outside.

pub mod address;
pub mod api;
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
pub mod presence;
pub mod routing;
pub mod security;
pub mod tools;
pub mod topology;
