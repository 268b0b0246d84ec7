//! Command-line clients that drive a node through its public interfaces (part of the binary, not
//! of the library: the server never imports them).

pub mod bench;
pub mod cli;
pub mod client;
