//! `reddog image`: create, create-diff, info, check, convert.
//!
//! The clap definitions live here so the main `reddog` binary can mount [`ImageCommand`]
//! as its `image` subcommand; `reddog-image` is the standalone binary.

use crate::check::{check, CheckReport};
use crate::error::{err, ErrorKind, Result};
use crate::msvhd::{self, hex, VhdType};
use crate::qcow2;
use crate::{ext4, BaseRef, CreateOptions, DiskImage, Format, OpenOptions};
use clap::{Args, Subcommand};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Disk image tools.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Create a standalone image (raw, qcow2, vhd), optionally an ext4 resource or role disk.
    Create(CreateArgs),
    /// Create a differencing image (qcow2 or vhd) over a base.
    CreateDiff(CreateDiffArgs),
    /// Show what an image's metadata says.
    Info(InfoArgs),
    /// Check an image's metadata (exit 0 clean, 2 corrupt, 3 leaked space only).
    Check(CheckArgs),
    /// Copy an image into a new one of another format.
    Convert(ConvertArgs),
}

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    s.parse::<Format>().map_err(|e| e.to_string())
}

/// Parses `123`, `4K`, `512M`, `10G`, `1T` (binary units).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}; use K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 10G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Arguments of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// raw, qcow2 or vhd.
    #[arg(short = 'f', long, value_parser = parse_format)]
    pub format: Format,
    /// Virtual size (e.g. 20G); optional with --from-dir.
    #[arg(short = 's', long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// qcow2 cluster size (default 64K).
    #[arg(long, value_parser = parse_size)]
    pub cluster_size: Option<u64>,
    /// VHD: fixed instead of dynamic.
    #[arg(long)]
    pub fixed: bool,
    /// VHD block size (default 2M).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Format the (raw) image as ext4: a resource disk.
    #[arg(long)]
    pub ext4: bool,
    /// Build an ext4 (raw) image holding this directory: a role disk.
    #[arg(long)]
    pub from_dir: Option<PathBuf>,
    /// ext4 volume label.
    #[arg(long, default_value = "reddog")]
    pub label: String,
    /// The image to create (must not exist).
    pub path: PathBuf,
}

/// Arguments of `create-diff`.
#[derive(Debug, Args)]
pub struct CreateDiffArgs {
    /// qcow2 or vhd.
    #[arg(short = 'f', long, value_parser = parse_format)]
    pub format: Format,
    /// The base image.
    #[arg(short = 'b', long)]
    pub base: PathBuf,
    /// The base's format.
    #[arg(short = 'F', long, value_parser = parse_format)]
    pub base_format: Format,
    /// Name recorded in the overlay (default: the base's file name if it is in the same
    /// directory, else its absolute path). Informational: never followed.
    #[arg(long)]
    pub base_name: Option<String>,
    /// Virtual size (default: the base's; may be larger).
    #[arg(short = 's', long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// qcow2 cluster size (default 64K).
    #[arg(long, value_parser = parse_size)]
    pub cluster_size: Option<u64>,
    /// The overlay to create (must not exist).
    pub path: PathBuf,
}

/// A base given on the command line.
#[derive(Debug, Args)]
pub struct BaseArgs {
    /// The base (backing/parent) image, for overlays.
    #[arg(short = 'b', long)]
    pub base: Option<PathBuf>,
    /// The base's format.
    #[arg(short = 'F', long, value_parser = parse_format)]
    pub base_format: Option<Format>,
}

/// Arguments of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The format; probed (advisory) when missing.
    #[arg(short = 'f', long, value_parser = parse_format)]
    pub format: Option<Format>,
    /// The image.
    pub path: PathBuf,
}

/// Arguments of `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The format.
    #[arg(short = 'f', long, value_parser = parse_format)]
    pub format: Format,
    #[command(flatten)]
    /// Base of an overlay (checked to match, and used by --read-all).
    pub base: BaseArgs,
    /// Also read every byte of the image.
    #[arg(long)]
    pub read_all: bool,
    /// The image.
    pub path: PathBuf,
}

/// Arguments of `convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format.
    #[arg(short = 'f', long, value_parser = parse_format)]
    pub format: Format,
    #[command(flatten)]
    /// Base of a source overlay.
    pub base: BaseArgs,
    /// Destination format.
    #[arg(short = 'O', long, value_parser = parse_format)]
    pub output_format: Format,
    /// qcow2 destination cluster size.
    #[arg(long, value_parser = parse_size)]
    pub cluster_size: Option<u64>,
    /// VHD destination: fixed instead of dynamic.
    #[arg(long)]
    pub fixed: bool,
    /// Source image.
    pub src: PathBuf,
    /// Destination image (must not exist).
    pub dst: PathBuf,
}

fn to_u32(v: Option<u64>, what: &str) -> Result<Option<u32>> {
    v.map(|x| {
        u32::try_from(x).map_err(|_| {
            err(
                ErrorKind::InvalidArgument,
                "parse arguments",
                format!("{what} is too large"),
            )
        })
    })
    .transpose()
}

/// Runs a command, printing its report to stdout; returns the process exit code.
pub fn run(cmd: &ImageCommand) -> Result<i32> {
    let mut out = String::new();
    let code = match cmd {
        ImageCommand::Create(a) => create_cmd(a, &mut out)?,
        ImageCommand::CreateDiff(a) => create_diff_cmd(a, &mut out)?,
        ImageCommand::Info(a) => {
            out = info(&a.path, a.format)?;
            0
        }
        ImageCommand::Check(a) => check_cmd(a, &mut out)?,
        ImageCommand::Convert(a) => convert_cmd(a, &mut out)?,
    };
    print!("{out}");
    Ok(code)
}

fn create_cmd(a: &CreateArgs, out: &mut String) -> Result<i32> {
    let op = "create image";
    if a.ext4 || a.from_dir.is_some() {
        if a.format != Format::Raw {
            return Err(err(
                ErrorKind::InvalidArgument,
                op,
                "ext4 resource/role disks are raw images; use -f raw",
            ));
        }
        if let Some(dir) = &a.from_dir {
            ext4::create_role_disk(&a.path, dir, a.size, &a.label)?;
            let _ = writeln!(
                out,
                "created role disk {} from {}",
                a.path.display(),
                dir.display()
            );
        } else {
            let size = a
                .size
                .ok_or_else(|| err(ErrorKind::InvalidArgument, op, "give --size"))?;
            ext4::create_resource_disk(&a.path, size, true, &a.label)?;
            let _ = writeln!(
                out,
                "created ext4 resource disk {} ({size} bytes)",
                a.path.display()
            );
        }
        return Ok(0);
    }
    let size = a.size.ok_or_else(|| {
        err(
            ErrorKind::InvalidArgument,
            op,
            "give --size (e.g. --size 20G)",
        )
    })?;
    let mut o = CreateOptions::new(size);
    o.cluster_size = to_u32(a.cluster_size, "cluster size")?;
    o.vhd_fixed = a.fixed;
    o.vhd_block_size = to_u32(a.block_size, "block size")?;
    crate::create(&a.path, a.format, &o)?;
    let _ = writeln!(
        out,
        "created {} image {} ({size} bytes)",
        a.format,
        a.path.display()
    );
    Ok(0)
}

/// The name to record for `base` in an overlay at `overlay`.
fn default_base_name(overlay: &Path, base: &Path) -> Result<String> {
    let op = "create differencing image";
    let abs_base =
        std::fs::canonicalize(base).map_err(|e| crate::DiskError::io(op, e).with_path(base))?;
    let overlay_dir = overlay
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let abs_dir = std::fs::canonicalize(&overlay_dir)
        .map_err(|e| crate::DiskError::io(op, e).with_path(&overlay_dir))?;
    let name = if abs_base.parent() == Some(abs_dir.as_path()) {
        abs_base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    } else {
        Some(abs_base.to_string_lossy().into_owned())
    };
    name.ok_or_else(|| err(ErrorKind::InvalidArgument, op, "the base has no file name"))
}

fn create_diff_cmd(a: &CreateDiffArgs, out: &mut String) -> Result<i32> {
    let image = open_base(&a.base, a.base_format)?;
    let name = match &a.base_name {
        Some(n) => n.clone(),
        None => default_base_name(&a.path, &a.base)?,
    };
    let b = BaseRef {
        image,
        name: name.clone(),
    };
    crate::create_diff(
        &a.path,
        a.format,
        &b,
        a.size,
        to_u32(a.cluster_size, "cluster size")?,
    )?;
    let _ = writeln!(
        out,
        "created {} overlay {} over {name}",
        a.format,
        a.path.display()
    );
    Ok(0)
}

/// Opens a base read-only. A base that is itself an overlay is refused here: the CLI
/// handles one level; chains are built through the library.
fn open_base(path: &Path, format: Format) -> Result<Arc<dyn DiskImage>> {
    crate::open(path, format, OpenOptions::read_only()).map_err(|e| {
        if e.kind() == ErrorKind::BackingRequired {
            err(
                ErrorKind::Unsupported,
                "open base image",
                "the base is itself an overlay; this command takes a standalone base (use convert to flatten it)",
            )
            .with_path(path)
        } else {
            e
        }
    })
}

fn open_with(path: &Path, format: Format, base: &BaseArgs) -> Result<Arc<dyn DiskImage>> {
    let backing = match (&base.base, base.base_format) {
        (Some(b), Some(f)) => Some(open_base(b, f)?),
        (Some(_), None) => {
            return Err(err(
                ErrorKind::InvalidArgument,
                "open image",
                "give the base's format with --base-format",
            ))
        }
        (None, _) => None,
    };
    crate::open(
        path,
        format,
        OpenOptions {
            read_only: true,
            backing,
        },
    )
    .map_err(|e| {
        if e.kind() == ErrorKind::BackingRequired {
            err(
                ErrorKind::BackingRequired,
                "open image",
                format!("{e}; pass --base PATH --base-format FORMAT"),
            )
            .with_path(path)
        } else {
            e
        }
    })
}

/// The `info` report.
pub fn info(path: &Path, format: Option<Format>) -> Result<String> {
    let (format, probed) = match format {
        Some(f) => (f, false),
        None => (crate::probe(path)?, true),
    };
    let mut s = String::new();
    let file_len = std::fs::metadata(path)
        .map_err(|e| crate::DiskError::io("read image info", e).with_path(path))?
        .len();
    let _ = writeln!(s, "image: {}", path.display());
    let _ = writeln!(
        s,
        "format: {format}{}",
        if probed {
            " (probed; pass -f to be sure)"
        } else {
            ""
        }
    );
    match format {
        Format::Raw => {
            let _ = writeln!(s, "virtual size: {file_len}");
        }
        Format::Qcow2 => {
            let h = qcow2::read_header_path(path)?;
            let _ = writeln!(s, "virtual size: {}", h.size);
            let _ = writeln!(s, "version: {}", h.version);
            let _ = writeln!(s, "cluster size: {}", h.cluster_size());
            let _ = writeln!(s, "refcount bits: {}", h.refcount_bits());
            if let Some(b) = &h.backing_file {
                let _ = writeln!(s, "backing file: {b} (recorded; never followed)");
                let _ = writeln!(
                    s,
                    "backing format: {}",
                    h.backing_format.as_deref().unwrap_or("(none)")
                );
            }
            if h.nb_snapshots > 0 {
                let _ = writeln!(s, "internal snapshots: {}", h.nb_snapshots);
            }
            if h.incompatible != 0 {
                let _ = writeln!(s, "incompatible features: {:#x}", h.incompatible);
            }
        }
        Format::Vhd => {
            let i = msvhd::info(path)?;
            let f = &i.footer;
            let t = match f.disk_type {
                VhdType::Fixed => "fixed",
                VhdType::Dynamic => "dynamic",
                VhdType::Differencing => "differencing",
            };
            let _ = writeln!(s, "virtual size: {}", f.current_size);
            let _ = writeln!(s, "vhd type: {t}");
            let _ = writeln!(s, "creator: {}", String::from_utf8_lossy(&f.creator_app));
            let _ = writeln!(
                s,
                "geometry (C/H/S): {}/{}/{}",
                f.geometry.0, f.geometry.1, f.geometry.2
            );
            let _ = writeln!(s, "unique id: {}", hex(&f.unique_id));
            if let Some(h) = &i.header {
                let _ = writeln!(s, "block size: {}", h.block_size);
                let _ = writeln!(s, "allocated blocks: {}", i.allocated_blocks);
                if f.disk_type == VhdType::Differencing {
                    let _ = writeln!(s, "parent: {} (recorded; never followed)", h.parent_name);
                    let _ = writeln!(s, "parent unique id: {}", hex(&h.parent_unique_id));
                    for l in &h.locators {
                        let _ = writeln!(s, "parent locator {}: {}", l.platform, l.path);
                    }
                }
            }
        }
    }
    let _ = writeln!(s, "file size: {file_len}");
    Ok(s)
}

fn print_report(rep: &CheckReport, out: &mut String) {
    for c in &rep.corruptions {
        let _ = writeln!(out, "ERROR {c}");
    }
    for l in &rep.leaks {
        let _ = writeln!(out, "Leak: {l}");
    }
    for n in &rep.notes {
        let _ = writeln!(out, "Note: {n}");
    }
    match rep.exit_code() {
        0 => {
            let _ = writeln!(out, "No errors were found on the image.");
        }
        3 => {
            let _ = writeln!(
                out,
                "{} leaks found; harmless, but the space is wasted.",
                rep.leaks.len()
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "{} errors found: the image is corrupt; restore it from its source or repair it with `qemu-img check -r all`.",
                rep.corruptions.len()
            );
        }
    }
}

fn check_cmd(a: &CheckArgs, out: &mut String) -> Result<i32> {
    let rep = check(&a.path, a.format)?;
    // Opening verifies the base matches (VHD parent IDs, qcow2 backing format).
    let needs_open = a.read_all || a.base.base.is_some();
    if needs_open {
        let img = open_with(&a.path, a.format, &a.base)?;
        if a.read_all {
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < img.size() {
                let n = (img.size() - off).min(buf.len() as u64) as usize;
                img.read_at(&mut buf[..n], off)?;
                off += n as u64;
            }
            let _ = writeln!(out, "read all {} bytes", img.size());
        }
    }
    print_report(&rep, out);
    Ok(rep.exit_code())
}

fn convert_cmd(a: &ConvertArgs, out: &mut String) -> Result<i32> {
    let src = open_with(&a.src, a.format, &a.base)?;
    let mut o = CreateOptions::new(src.size());
    o.cluster_size = to_u32(a.cluster_size, "cluster size")?;
    o.vhd_fixed = a.fixed;
    crate::convert::convert(src.as_ref(), &a.dst, a.output_format, &o)?;
    let _ = writeln!(
        out,
        "converted {} ({}) to {} ({})",
        a.src.display(),
        a.format,
        a.dst.display(),
        a.output_format
    );
    Ok(0)
}
