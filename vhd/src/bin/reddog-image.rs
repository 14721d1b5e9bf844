//! `reddog-image`: the disk image tool (later mounted as `reddog image`).
#![forbid(unsafe_code)]

use clap::Parser;

/// Create, inspect, check and convert raw, qcow2 and VHD disk images.
#[derive(Debug, Parser)]
#[command(name = "reddog-image", version)]
struct Cli {
    #[command(subcommand)]
    cmd: vhd::cli::ImageCommand,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = vhd::cli::run(&cli.cmd)?;
    std::process::exit(code);
}
