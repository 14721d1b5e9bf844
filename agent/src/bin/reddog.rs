//! `reddog`: the user-facing command line. Today: `reddog image ...`, the disk
//! image tool (create, create-diff, info, check, convert). The agent's API
//! commands join it with the host agent.

use clap::{Parser, Subcommand};

/// reddog: host agent and VMM tools.
#[derive(Debug, Parser)]
#[command(name = "reddog", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, inspect, check and convert raw, qcow2 and VHD disk images.
    #[command(subcommand)]
    Image(vhd::cli::ImageCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let code = match &cli.cmd {
        Command::Image(cmd) => vhd::cli::run(cmd)?,
    };
    std::process::exit(code);
}
