//! `reddog`: the user-facing command line. `reddog image ...` is the image
//! tool: disk images (create, create-diff, info, check, convert: the `vhd`
//! crate) and the guest's artifacts (kernel, initramfs, os-base: the
//! `guest-image` crate); the other commands drive a running `reddog-agent` over
//! its unix socket.

use std::path::{Path, PathBuf};

use agent::api::client::ApiClient;
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
    /// Disk images (raw, qcow2, VHD) and the guest's kernel, initramfs and OS base image.
    #[command(subcommand)]
    Image(ImageCmd),
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
    /// An instance's VMM as it reports itself over its control socket:
    /// info and metrics (JSON).
    Vmm {
        /// The instance's id.
        id: String,
    },
    /// Pause an instance's VMM (vCPUs parked; heartbeats not expected until
    /// it resumes).
    Pause {
        /// The instance's id.
        id: String,
    },
    /// Resume a paused instance.
    Resume {
        /// The instance's id.
        id: String,
    },
    /// The node report (JSON).
    Node,
    /// The agent's image cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    #[command(flatten)]
    Disk(vhd::cli::ImageCommand),
    /// Fetch a Debian kernel (default: Debian 12's stock cloud kernel) with apt
    /// (checked against apt's sha256), extract and cache it; print the paths of
    /// the bzImage, vmlinux (if the bzImage's compression allows) and modules
    /// directory, and the entry protocols it supports, as JSON.
    Kernel {
        /// The cache root (default `$REDDOG_CACHE`, else `$HOME/.cache/reddog`).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// A Debian kernel package instead, e.g. linux-image-amd64 (generic).
        #[arg(long, value_name = "NAME")]
        package: Option<String>,
        /// A local kernel .deb instead.
        #[arg(long, value_name = "FILE")]
        deb: Option<PathBuf>,
        /// A bzImage instead (with --modules).
        #[arg(long, value_name = "FILE")]
        vmlinuz: Option<PathBuf>,
        /// Its /lib/modules/<release> directory.
        #[arg(long, value_name = "DIR")]
        modules: Option<PathBuf>,
    },
    /// Build the guest initramfs: a static reddog-guest as /init plus the cached
    /// kernel's virtio and vsock modules (fetching the kernel if needed).
    Initramfs {
        /// A statically linked reddog-guest.
        #[arg(long, value_name = "PATH")]
        guest_agent: PathBuf,
        /// Where to write the initramfs (newc cpio).
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
        /// The kernel cache root (default `$REDDOG_CACHE`, else `$HOME/.cache/reddog`).
        #[arg(long, value_name = "DIR")]
        kernel_cache: Option<PathBuf>,
    },
    /// Build the OS base image: raw ext4 (label reddog-os) with Debian's
    /// busybox-static and a static reddog-guest as /sbin/reddog-guest.
    OsBase {
        /// A statically linked reddog-guest.
        #[arg(long, value_name = "PATH")]
        guest_agent: PathBuf,
        /// Where to write the image.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
    },
}

fn kernel_in(
    cache: Option<&Path>,
    source: &guest_image::KernelSource,
) -> anyhow::Result<guest_image::KernelArtifacts> {
    let cache = match cache {
        Some(c) => c.to_owned(),
        None => guest_image::artifacts::cache_root()?,
    };
    let k = guest_image::kernel_in(source, &cache)?;
    k.verify()?;
    Ok(k)
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `reddog image ...`: returns the exit code.
fn image(cmd: &ImageCmd) -> anyhow::Result<i32> {
    match cmd {
        ImageCmd::Disk(cmd) => return Ok(vhd::cli::run(cmd)?),
        ImageCmd::Kernel {
            cache,
            package,
            deb,
            vmlinuz,
            modules,
        } => {
            let source = guest_image::KernelSource::from_flags(
                package.as_deref(),
                deb.as_deref(),
                vmlinuz.as_deref(),
                modules.as_deref(),
            )?;
            let k = kernel_in(cache.as_deref(), &source)?;
            print_json(&serde_json::json!({
                "package": k.package,
                "version": k.version,
                "release": k.release,
                "deb_sha256": k.deb_sha256,
                "dir": k.dir,
                "bzimage": k.vmlinuz,
                "vmlinux": k.vmlinux,
                "vmlinux_error": k.vmlinux_error,
                "entries": k.entries(),
                "modules_dir": k.modules_dir,
            }))?;
        }
        ImageCmd::Initramfs {
            guest_agent,
            output,
            kernel_cache,
        } => {
            // Refuse a dynamic guest agent before fetching anything.
            guest_image::artifacts::require_static(
                guest_agent,
                "build reddog-guest with RUSTFLAGS=\"-C target-feature=+crt-static\"",
            )?;
            let k = kernel_in(kernel_cache.as_deref(), &guest_image::KernelSource::Cloud)?;
            let (bytes, modules) = guest_image::initramfs(&k, guest_agent)?;
            std::fs::write(output, &bytes)
                .with_context(|| format!("cannot write {}", output.display()))?;
            print_json(&serde_json::json!({
                "initramfs": output,
                "bytes": bytes.len(),
                "modules": modules,
                "kernel_release": k.release,
                "vmlinux": k.vmlinux,
                "bzimage": k.vmlinuz,
            }))?;
        }
        ImageCmd::OsBase {
            guest_agent,
            output,
        } => {
            let busybox = guest_image::os_image::write_base_image(guest_agent, output)?;
            print_json(&serde_json::json!({
                "image": output,
                "format": "raw",
                "label": "reddog-os",
                "size": guest_image::os_image::BASE_IMAGE_SIZE,
                "busybox_static": busybox,
                "layout": guest_image::os_image::LAYOUT_VERSION,
            }))?;
        }
    }
    Ok(0)
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
    /// Import a base image: a file on the agent's node, or an http:// URL
    /// (downloaded here with a progress bar, then imported; `--sha256` required).
    Import {
        /// The image file (or use --url).
        #[arg(required_unless_present = "url", conflicts_with = "url")]
        path: Option<PathBuf>,
        /// Download the image from this http:// URL.
        #[arg(long)]
        url: Option<String>,
        /// Its format: raw, qcow2 or vhd.
        #[arg(long, short = 'f')]
        format: String,
        /// The expected sha256.
        #[arg(long)]
        sha256: Option<String>,
        /// With --url: download into this directory, which must be under one
        /// of the agent's --import-root directories.
        #[arg(
            long,
            env = "REDDOG_DOWNLOAD_DIR",
            default_value = "/var/lib/reddog/imports"
        )]
        download_dir: PathBuf,
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
        Command::Vmm { id } => {
            c.call(Method::GET, &format!("/v1/instances/{id}/vmm"), None)
                .await?
        }
        Command::Pause { id } => {
            c.call(Method::POST, &format!("/v1/instances/{id}/pause"), None)
                .await?
        }
        Command::Resume { id } => {
            c.call(Method::POST, &format!("/v1/instances/{id}/resume"), None)
                .await?
        }
        Command::Node => c.call(Method::GET, "/v1/node", None).await?,
        Command::Cache(CacheCommand::List) => c.call(Method::GET, "/v1/images", None).await?,
        Command::Cache(CacheCommand::Import {
            path,
            url,
            format,
            sha256,
            download_dir,
        }) => {
            // A URL is downloaded next to us (same node) with a progress bar,
            // then imported like a file; the agent checks the sha256.
            let tmp = match url {
                Some(u) => {
                    if sha256.is_none() {
                        anyhow::bail!("--url needs --sha256: a download is only imported when its hash is known");
                    }
                    Some(download_with_progress(u, download_dir).await?)
                }
                None => None,
            };
            let path = match (&tmp, path) {
                (Some(t), _) => t.path().to_owned(),
                (None, Some(p)) => std::path::absolute(p)?,
                (None, None) => anyhow::bail!("give an image path or --url"),
            };
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

/// Downloads `url` into a temporary file in `dir`, drawing a progress bar on stderr.
async fn download_with_progress(
    url: &str,
    dir: &std::path::Path,
) -> anyhow::Result<tempfile::NamedTempFile> {
    use anyhow::Context as _;
    use std::io::Write as _;
    let parsed = agent::api::http::HttpUrl::parse(url)?;
    let mut tmp = tempfile::Builder::new()
        .prefix("reddog-import-")
        .tempfile_in(dir)
        .with_context(|| {
            format!(
                "cannot create a download file in {}; give --download-dir, a directory under one of the agent's --import-root directories",
                dir.display()
            )
        })?;
    let started = std::time::Instant::now();
    let total = std::sync::Mutex::new(None::<u64>);
    let mut done = 0u64;
    let mut last_draw = std::time::Instant::now() - std::time::Duration::from_secs(1);
    let draw = |done: u64, total: Option<u64>, last: bool| {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let rate = mib(done) / started.elapsed().as_secs_f64().max(1e-3);
        let line = match total {
            Some(t) if t > 0 => {
                let pct = (done.min(t) * 100 / t) as usize;
                let bar: String = (0..30)
                    .map(|i| if i * 100 / 30 < pct { '#' } else { ' ' })
                    .collect();
                format!(
                    "\r[{bar}] {pct:3}% {:.1}/{:.1} MiB {rate:.1} MiB/s",
                    mib(done),
                    mib(t)
                )
            }
            _ => format!("\r{:.1} MiB {rate:.1} MiB/s", mib(done)),
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "{line}{}", if last { "\n" } else { "" });
        let _ = err.flush();
    };
    let status = agent::api::http::download_with_length(
        &parsed,
        std::time::Duration::from_secs(30),
        |len| *total.lock().unwrap_or_else(|p| p.into_inner()) = len,
        |chunk| {
            tmp.write_all(chunk).map_err(|e| e.to_string())?;
            done += chunk.len() as u64;
            if last_draw.elapsed() >= std::time::Duration::from_millis(100) {
                last_draw = std::time::Instant::now();
                draw(
                    done,
                    *total.lock().unwrap_or_else(|p| p.into_inner()),
                    false,
                );
            }
            Ok(())
        },
    )
    .await?;
    if !status.is_success() {
        anyhow::bail!("download {url}: HTTP {status}");
    }
    draw(done, *total.lock().unwrap_or_else(|p| p.into_inner()), true);
    tmp.as_file().sync_all()?;
    Ok(tmp)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Image(cmd) = &cli.cmd {
        let code = image(cmd)?;
        std::process::exit(code);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(api(&cli))
}
