//! The `signalpost` binary: `serve` runs a node; the other subcommands are tools that talk to a
//! node's public interfaces.

use anyhow::Context;
use clap::{Parser, Subcommand};
use signalpost::config::{Backend, Config, Overrides};
mod tools;

use std::path::PathBuf;
#[cfg(feature = "tools")]
use tools::cli;

#[derive(Parser)]
#[command(
    name = "signalpost",
    version,
    about = "A clustered signal delivery server"
)]
#[cfg_attr(
    not(feature = "tools"),
    command(
        after_help = "The tools (bench, tail, enqueue, bind, mailbox, client, nodes, backup) are left out of \
                      this build: cargo build --release --features tools"
    )
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[cfg(feature = "tools")]
    #[command(flatten)]
    target: cli::Target,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (the default when no subcommand is given).
    ///
    /// Example: signalpost serve --listen 127.0.0.1:0 --data-dir /tmp/sp
    Serve(ServeArgs),
    #[cfg(feature = "tools")]
    /// Drive a running node through HTTP and Socket.IO and print what it sustains.
    ///
    /// Example: signalpost bench --url http://127.0.0.1:8080 --scenario fanout --clients 1000
    Bench(tools::bench::BenchArgs),
    #[cfg(feature = "tools")]
    /// Send a message (or a file of them) through the server API.
    Enqueue(cli::EnqueueArgs),
    #[cfg(feature = "tools")]
    /// Bind a client to addresses.
    Bind(cli::BindArgs),
    #[cfg(feature = "tools")]
    /// Unbind a client from addresses.
    Unbind(cli::BindArgs),
    #[cfg(feature = "tools")]
    /// Read an address's mailbox.
    Mailbox(cli::MailboxArgs),
    #[cfg(feature = "tools")]
    /// Show a client: bindings, cursors, presence.
    ///
    /// Example: signalpost client 3f2a9c…
    Client {
        /// The client id
        id: String,
    },
    #[cfg(feature = "tools")]
    /// Have a running embedded node write a consistent copy of its store into its data dir's
    /// backups/ folder, and print where (POST /server/backup).
    ///
    /// Example: signalpost backup --url http://127.0.0.1:8080
    Backup,
    #[cfg(feature = "tools")]
    /// List the live nodes and the leader.
    ///
    /// Example: signalpost nodes --url http://127.0.0.1:8081
    Nodes,
    #[cfg(feature = "tools")]
    /// Follow addresses as a Socket.IO client and print signals as JSON lines.
    Tail(cli::TailArgs),
    /// The protocol side of scripts/stack: readiness probes, Kafka topics, a CQL client
    /// (needs a build with --features cluster).
    ///
    /// Example: signalpost stack probe cassandra
    Stack(tools::stack::StackArgs),
    /// Give back the disk space a stopped embedded node's store no longer uses (its files are
    /// copy-on-write and never shrink by themselves). Refused while a node runs on the dir.
    ///
    /// Example: signalpost compact --data-dir ./data
    Compact(CompactArgs),
    #[cfg(feature = "cluster")]
    /// One-off upgrade steps on a cluster's Cassandra keyspace, run once every node runs this
    /// version (docs/operations.md). Reads the same configuration as `serve`.
    ///
    /// Example: signalpost migrate bindings --config signalpost.toml
    Migrate(MigrateArgs),
    /// Without the tools feature: any tool's name, answered with how to get the tools.
    #[cfg(not(feature = "tools"))]
    #[command(external_subcommand)]
    Tool(Vec<String>),
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// host:port to listen on (port 0 picks a free port) [env: SIGNALPOST_LISTEN] [default: 127.0.0.1:8080]
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Where the embedded store keeps its files [env: SIGNALPOST_DATA_DIR] [default: ./data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// embedded (no outside service) or cluster (Cassandra, Kafka, ZooKeeper) [env: SIGNALPOST_BACKEND]
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// A TOML file with any configuration key (see docs/configuration.md)
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CompactArgs {
    /// The data dir [env: SIGNALPOST_DATA_DIR] [default: ./data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A TOML file with any configuration key; only data_dir is read
    #[arg(long)]
    config: Option<PathBuf>,
}

/// `signalpost compact`: the data dir's redb files compacted, each one's size before and after.
fn compact(args: CompactArgs) -> anyhow::Result<()> {
    let config = Config::load(
        args.config.as_deref(),
        &Overrides {
            listen: None,
            data_dir: args.data_dir,
            backend: None,
        },
    )?;
    let started = std::time::Instant::now();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for c in signalpost::node::compact(&config.data_dir)? {
        println!(
            "{}: {:.1} MiB -> {:.1} MiB",
            c.file,
            mib(c.before),
            mib(c.after)
        );
    }
    println!(
        "compacted {} in {:.1} s",
        config.data_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(feature = "cluster")]
#[derive(clap::Args)]
struct MigrateArgs {
    /// What to migrate
    #[arg(value_enum)]
    step: MigrateStep,
    /// A TOML file with any configuration key (see docs/configuration.md)
    #[arg(long)]
    config: Option<PathBuf>,
}

#[cfg(feature = "cluster")]
#[derive(Clone, Copy, clap::ValueEnum)]
enum MigrateStep {
    /// Make client_bindings the record of bindings (schema/010_client_bindings.cql).
    Bindings,
}

/// `signalpost migrate bindings`: the keyspace's bindings caught up and switched to rows.
#[cfg(feature = "cluster")]
async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let config = Config::load(
        args.config.as_deref(),
        &Overrides {
            listen: None,
            data_dir: None,
            backend: None,
        },
    )?;
    let MigrateStep::Bindings = args.step;
    let session = signalpost::cassandra::open(&config.cassandra, "migrate")
        .await
        .context("opening the Cassandra keyspace")?;
    let done = signalpost::topology::cassandra::migrate_bindings(
        session.into(),
        &config.cassandra.keyspace,
    )
    .await
    .context("migrating the bindings")?;
    let ks = &config.cassandra.keyspace;
    if done.already != signalpost::topology::cassandra::Layout::Legacy {
        println!("bindings of keyspace {ks}: client_bindings is the record already; nothing to do");
        return Ok(());
    }
    println!(
        "bindings of keyspace {ks}: {} clients looked at, {} rows written; client_bindings is \
         the record now, and nodes switch to it within {} s",
        done.clients,
        done.changed,
        signalpost::topology::cassandra::LAYOUT_RECHECK.as_secs()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        // The node sizes its own runtime from its configuration; the other commands take the
        // default one.
        Command::Serve(args) => serve(args),
        Command::Compact(args) => compact(args),
        #[cfg(feature = "cluster")]
        Command::Migrate(args) => runtime(0)?.block_on(migrate(args)),
        #[cfg(not(feature = "tools"))]
        Command::Tool(args) => {
            eprintln!(
                "signalpost {} is one of the tools, and this binary was built without them: \
                 cargo build --release --features tools",
                args.first().map_or("", String::as_str)
            );
            std::process::exit(2)
        }
        #[cfg(feature = "tools")]
        Command::Bench(mut args) => {
            args.url = cli.target.url.clone();
            args.api_key = cli.target.api_key.clone();
            runtime(0)?.block_on(tools::bench::run(args))?;
            Ok(())
        }
        #[cfg(feature = "cluster")]
        Command::Stack(args) => runtime(0)?.block_on(tools::stack::run(args)).map_err(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        }),
        #[cfg(not(feature = "cluster"))]
        Command::Stack(args) => tools::stack::run(args),
        #[cfg(feature = "tools")]
        tool => runtime(0)?
            .block_on(run_tool(&cli.target, tool))
            .map_err(|e| {
                eprintln!("error: {e}");
                std::process::exit(1)
            }),
    }
}

#[cfg(feature = "tools")]
async fn run_tool(t: &cli::Target, tool: Command) -> Result<(), tools::client::ClientError> {
    match tool {
        Command::Enqueue(a) => cli::enqueue(t, a).await,
        Command::Bind(a) => cli::bind(t, a, true).await,
        Command::Unbind(a) => cli::bind(t, a, false).await,
        Command::Mailbox(a) => cli::mailbox(t, a).await,
        Command::Client { id } => cli::client(t, &id).await,
        Command::Nodes => cli::get(t, "/server/nodes").await,
        Command::Backup => cli::post(t, "/server/backup").await,
        Command::Tail(a) => cli::tail(t, a).await,
        #[cfg(feature = "cluster")]
        Command::Migrate(_) => unreachable!("handled in main"),
        Command::Serve(_) | Command::Compact(_) | Command::Bench(_) | Command::Stack(_) => {
            unreachable!("handled in main")
        }
    }
}

/// The async runtime: `workers` threads, or one per core when 0.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        b.worker_threads(workers);
    }
    b.enable_all().build().context("starting the runtime")
}

/// The node: its configuration is read first, as it sizes the runtime the node runs on.
fn serve(args: ServeArgs) -> anyhow::Result<()> {
    signalpost::node::init_logging();
    let flags = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        backend: args.backend,
    };
    let config = Config::load(args.config.as_deref(), &flags)?;
    let rt = runtime(config.workers)?;
    let out = rt.block_on(signalpost::node::serve(config));
    // Dropping a runtime waits for its blocking tasks however long they take; a stopping node
    // gives them a bound instead (its drain has already ended).
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    Ok(out?)
}
