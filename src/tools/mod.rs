//! Command-line clients that drive a node through its public interfaces.
