//! The `chimed` binary: parses the command line, sets up logging, and runs `serve`, `migrate`,
//! the storage agent (`node`) or an `admin` command. Everything of substance lives in the
//! `chimed` library.
//!
//! Any failure ends the process with exit status 1 and one line on stderr, `chimed: REASON`,
//! with the causes joined by `: `. `admin` commands also exit 1, after their report, when a node
//! is unreachable or has bad objects.

use anyhow::Context;
use chimed::cli::{
    self, AdminCommand, AdminNodesArgs, AdminRebalanceArgs, AdminVerifyArgs, Cli, Command, MigrateArgs, ServeArgs,
};
use chimed::config::{redact_database_url, Config};
use chimed::content::{self, Content};
use chimed::node::{admin, LinkOptions, Nodes};
use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.into_command();
    // An admin command's output is its report; the links' own progress lines would only get in
    // the way (their failures are in the report).
    let default_filter = match command {
        Command::Admin(_) => "warn",
        _ => "info,refinery_core=warn,postgres=warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter)).init();
    let result = match command {
        Command::Serve(args) => serve(&args).map(|()| ExitCode::SUCCESS),
        Command::Migrate(args) => migrate(&args).map(|()| ExitCode::SUCCESS),
        // stdout is the protocol: nothing else may print there.
        Command::Node(args) => chimed::node::agent::run(&args.root).map(|()| ExitCode::SUCCESS).map_err(Into::into),
        Command::Admin(AdminCommand::Nodes(args)) => admin_nodes(&args),
        Command::Admin(AdminCommand::Verify(args)) => admin_verify(&args),
        Command::Admin(AdminCommand::Rebalance(args)) => admin_rebalance(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line, whatever the underlying errors put in their messages.
            let reason = format!("{e:#}").replace('\n', " ");
            eprintln!("chimed: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    if args.check_config {
        // Given certificate files are checked too (read-only); a self-signed one is not created.
        if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
            chimed::tls::load(cert, key).context("TLS")?;
        }
        println!("configuration ok");
        return Ok(());
    }
    config.create_data_dir().with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    config.warn_if_data_dir_is_shared();
    let tls = chimed::tls::load_or_create(&config).context("TLS")?;
    let url = config.database_url();
    // Migrations run here, once, so an unreachable database fails before anything listens.
    open_store(&url)?;
    chimed::server::run(config, url, Some(tls))
}

fn migrate(args: &MigrateArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    create_data_dir_for_store(&config)?;
    let url = config.database_url();
    open_store(&url)?;
    log::info!("database {} is up to date", redact_database_url(&url));
    Ok(())
}

fn create_data_dir_for_store(config: &Config) -> anyhow::Result<()> {
    if config.database_in_data_dir() {
        config.create_data_dir().with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    }
    Ok(())
}

fn open_store(url: &str) -> anyhow::Result<()> {
    chime_storage::open(url).map(drop).with_context(|| format!("cannot open database {}", redact_database_url(url)))
}

fn link_options(timeout_secs: u64) -> LinkOptions {
    let timeout = Duration::from_secs(timeout_secs.max(1));
    LinkOptions { connect_timeout: timeout, reply_timeout: timeout, ..LinkOptions::default() }
}

fn admin_nodes(args: &AdminNodesArgs) -> anyhow::Result<ExitCode> {
    let config = cli::admin_config(args.config.as_deref())?;
    if config.node.is_empty() {
        eprintln!("chimed: no storage nodes are configured ([[node]] tables in --config FILE)");
        return Ok(ExitCode::SUCCESS);
    }
    let nodes = Nodes::from_config(&config, &link_options(args.timeout));
    let destinations: Vec<String> = config.node.iter().map(|node| node.ssh.clone()).collect();
    // Files per node from the placements the daemon recorded (read-only; none without a cache).
    let placed = content::index::counts_at(&config.cache_dir().join("index.sqlite")).unwrap_or_else(|e| {
        log::warn!("cannot read the placements: {e}");
        Vec::new()
    });
    let all_up = admin::print_nodes(&nodes, &destinations, &placed, args.json, &mut std::io::stdout().lock())?;
    Ok(if all_up { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn admin_verify(args: &AdminVerifyArgs) -> anyhow::Result<ExitCode> {
    let config = cli::admin_config(args.config.as_deref())?;
    let nodes = Nodes::from_config(&config, &link_options(args.timeout));
    let Some(link) = nodes.get(&args.node) else {
        let known: Vec<&str> = config.node.iter().map(|node| node.name.as_str()).collect();
        anyhow::bail!("no node named {:?} in the configuration (nodes: {})", args.node, known.join(", "));
    };
    let bad = admin::print_verify(link, args.json, &mut std::io::stdout().lock())?;
    Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn admin_rebalance(args: &AdminRebalanceArgs) -> anyhow::Result<ExitCode> {
    let mut config = cli::admin_config(args.config.as_deref())?;
    if let Some(dir) = &args.data_dir {
        config.data_dir.clone_from(dir);
    }
    let dir = config.cache_dir();
    let timeout = Duration::from_secs(args.timeout.max(1));
    let nodes = std::sync::Arc::new(Nodes::from_config(&config, &link_options(args.timeout.min(60))));
    let report = match Content::open(&dir, config.files.cache_quota, nodes) {
        // No daemon has the cache: rebalance here, holding its lock.
        Ok(store) => store.rebalance(),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            content::background::request_rebalance(&dir, timeout)
                .with_context(|| format!("asking the daemon that holds {} to rebalance", dir.display()))?
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot open the cache {}", dir.display()))),
    };
    let ok = report.errors.is_empty() && report.unreachable.is_empty();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "rebalanced: {} moved out, {} evicted over quota, {} copies added, {} moved between nodes, {} pulled back, {} placements confirmed, {} dropped, {} adopted, {} forgotten copies deleted",
            report.moved_out, report.evicted, report.replicated, report.moved_between_nodes, report.pulled_back,
            report.confirmed, report.dropped, report.adopted, report.deleted
        );
        for node in &report.unreachable {
            println!("unreachable: {node}");
        }
        for error in &report.errors {
            println!("error: {error}");
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
