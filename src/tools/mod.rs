//! Command-line clients that drive a node through its public interfaces, and `stack`, the
//! protocol side of `scripts/stack` (part of the binary, not of the library: the server never
//! imports them). The clients are the cargo feature `tools` (which `cluster` includes).

#[cfg(feature = "tools")]
pub mod bench;
#[cfg(feature = "tools")]
pub mod cli;
#[cfg(feature = "tools")]
pub mod client;
#[cfg(feature = "cluster")]
pub mod stack;

/// Without the cluster feature, `signalpost stack …` only says how to get it (and fails, so
/// that `scripts/stack` can tell such a binary from one it can use).
#[cfg(not(feature = "cluster"))]
pub mod stack {
    #[derive(Debug, clap::Args)]
    #[command(disable_help_flag = true)]
    pub struct StackArgs {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    }

    pub fn run(_: StackArgs) -> ! {
        eprintln!(
            "signalpost stack needs the cluster clients (Cassandra, Kafka, ZooKeeper), and this \
             binary was built without them: cargo build --release --features cluster"
        );
        std::process::exit(2)
    }
}
