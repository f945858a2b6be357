//! The `chimed` binary: parses the command line, sets up logging, and runs `serve` or `migrate`.
//! Everything of substance lives in the `chimed` library.
//!
//! Any failure ends the process with exit status 1 and one line on stderr, `chimed: REASON`,
//! with the causes joined by `: `.

use anyhow::Context;
use chimed::cli::{Cli, Command, MigrateArgs, ServeArgs};
use chimed::config::{redact_database_url, Config};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,refinery_core=warn,postgres=warn"),
    )
    .init();
    let result = match cli.into_command() {
        Command::Serve(args) => serve(&args),
        Command::Migrate(args) => migrate(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
