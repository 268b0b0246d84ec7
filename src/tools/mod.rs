//! Command-line clients that drive a node through its public interfaces.

pub mod bench;
pub mod cli;
pub mod client;
