//! `reddog`: the user-facing command line. `reddog image ...` is the disk
//! image tool (create, create-diff, info, check, convert); the other commands
//! drive a running `reddog-agent` over its unix socket.

use std::path::PathBuf;

use agent::client::ApiClient;
use anyhow::Context;
use clap::{Parser, Subcommand};
use hyper::Method;

/// reddog: host agent and VMM tools.
#[derive(Debug, Parser)]
#[command(name = "reddog", version)]
struct Cli {
    /// The agent's API socket.
    #[arg(
        long,
        global = true,
        env = "REDDOG_AGENT_SOCKET",
        default_value = "/var/lib/reddog/agent.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, inspect, check and convert raw, qcow2 and VHD disk images.
    #[command(subcommand)]
    Image(vhd::cli::ImageCommand),
    /// The goal state.
    #[command(subcommand)]
    Goal(GoalCommand),
    /// List instances.
    Instances,
    /// One instance with its transition history (JSON).
    Instance {
        /// Its id.
        id: String,
    },
    /// The node report (JSON).
    Node,
    /// The agent's image cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Debug, Subcommand)]
enum GoalCommand {
    /// Apply a goal state from a JSON file ("-" for stdin).
    Put {
        /// The file.
        file: PathBuf,
    },
    /// Print the applied goal state.
    Get,
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// List cached base images.
    List,
    /// Import a base image file (a path on the agent's node).
    Import {
        /// The image.
        path: PathBuf,
        /// Its format: raw, qcow2 or vhd.
        #[arg(long, short = 'f')]
        format: String,
        /// The expected sha256.
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Delete images no instance uses.
    Gc,
}

fn print_instances(json: &str) -> anyhow::Result<()> {
    let list: Vec<serde_json::Value> = serde_json::from_str(json)?;
    println!(
        "{:<24} {:<16} {:>8} {:<12} ROLE",
        "ID", "STATE", "RESTARTS", "ROLE-STATE"
    );
    for i in list {
        let s = |k: &str| i.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
        println!(
            "{:<24} {:<16} {:>8} {:<12} {}",
            s("id"),
            s("state"),
            i.get("restarts").and_then(|v| v.as_u64()).unwrap_or(0),
            s("role"),
            i.pointer("/spec/role")
                .and_then(|v| v.as_str())
                .unwrap_or("-"),
        );
    }
    Ok(())
}

async fn api(cli: &Cli) -> anyhow::Result<()> {
    let c = ApiClient::new(&cli.socket);
    let out = match &cli.cmd {
        Command::Image(_) => unreachable!("handled in main"),
        Command::Goal(GoalCommand::Put { file }) => {
            let body = if file.as_os_str() == "-" {
                let mut s = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
            };
            c.call(Method::PUT, "/v1/goal", Some(body)).await?
        }
        Command::Goal(GoalCommand::Get) => c.call(Method::GET, "/v1/goal", None).await?,
        Command::Instances => {
            let j = c.call(Method::GET, "/v1/instances", None).await?;
            return print_instances(&j);
        }
        Command::Instance { id } => {
            c.call(Method::GET, &format!("/v1/instances/{id}"), None)
                .await?
        }
        Command::Node => c.call(Method::GET, "/v1/node", None).await?,
        Command::Cache(CacheCommand::List) => c.call(Method::GET, "/v1/images", None).await?,
        Command::Cache(CacheCommand::Import {
            path,
            format,
            sha256,
        }) => {
            let path = std::path::absolute(path)?;
            let body = serde_json::json!({ "path": path, "format": format, "sha256": sha256 });
            c.call(Method::POST, "/v1/images", Some(serde_json::to_vec(&body)?))
                .await?
        }
        Command::Cache(CacheCommand::Gc) => c.call(Method::POST, "/v1/images/gc", None).await?,
    };
    match serde_json::from_str::<serde_json::Value>(&out) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) => print!("{out}"),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Image(cmd) = &cli.cmd {
        let code = vhd::cli::run(cmd)?;
        std::process::exit(code);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(api(&cli))
}
