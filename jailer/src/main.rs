//! `reddog-jailer`: runs one `reddog-vmm` jailed (see `docs/isolation.md`).

#![allow(unsafe_code)]

use std::path::PathBuf;

use jailer::{CgroupConfig, JailConfig, Rlimits};

const USAGE: &str = "\
reddog-jailer: run one reddog-vmm in a jail (namespaces, pivot_root, its own uid and gid,
a cgroup, no capabilities, no_new_privs, rlimits). Must run as root. Prints `<pid> <start
time>` of the VMM (also written to <base>/<id>/vmm.pid), then exits (the VMM runs on) or,
with --wait, waits for it.

Usage: reddog-jailer --id <ID> --uid <N> --gid <N> --base <DIR> --vmm <BIN> --config <FILE> [OPTIONS]
       reddog-jailer --remove --id <ID> --base <DIR> [--cgroup-root <DIR>] [--cgroup-parent <NAME>]

Options:
  --id <ID>                 instance id: the jail <base>/<id> and the cgroup <parent>/<id>
  --uid <N>, --gid <N>      the VMM's ids (never 0)
  --base <DIR>              the jails' base directory
  --run-dir <DIR>           the VM's socket directory, the jail's /run [default: <base>/<id>/run];
                            the config's api_sock and vsock socket must lie in it
  --vmm <BIN>               the statically linked reddog-vmm
  --config <FILE>           its VM config (host paths; rewritten for the jail)
  --cgroup-root <DIR>       [default: /sys/fs/cgroup]
  --cgroup-parent <NAME>    [default: reddog]
  --vmm-overhead-mib <N>    memory limit = guest memory + this [default: 128]
  --pids-max <N>            [default: 256]
  --nofile <N>              RLIMIT_NOFILE [default: 2048]
  --fsize-mib <N>           RLIMIT_FSIZE [default: the larger of 64 MiB and its writable disks' bound]
  --nproc <N>               RLIMIT_NPROC [default: 256]
  --new-net                 also a new network namespace (TAPs then only as inherited fds)
  --wait                    stay as the VMM's parent and exit as it does (its status, or
                            killed by its signal) instead of exiting at once
  --remove                  remove the jail directory and cgroup of a VMM that has exited
  -h, --help                print this help
";

fn number(flag: &str, v: &str) -> Result<u64, String> {
    v.parse()
        .map_err(|e| format!("invalid value {v:?} for {flag}: {e}"))
}

fn main() {
    // The jail's own modes are set here, not inherited: under the agent's
    // umask (0077) the jail's /dev and root would be closed to the VM's uid.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    match run() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("reddog-jailer: error: {e}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<(), String> {
    let mut it = std::env::args().skip(1);
    let (mut id, mut uid, mut gid, mut base) = (None, None, None, None);
    let (mut run_dir, mut vmm, mut config) = (None, None, None);
    let mut cg = CgroupConfig::default();
    let mut rl = Rlimits::default();
    let (mut new_net, mut remove, mut wait) = (false, false, false);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            "--id" => id = Some(value()?),
            "--uid" => {
                uid = Some(u32::try_from(number(&flag, &value()?)?).map_err(|e| e.to_string())?)
            }
            "--gid" => {
                gid = Some(u32::try_from(number(&flag, &value()?)?).map_err(|e| e.to_string())?)
            }
            "--base" => base = Some(PathBuf::from(value()?)),
            "--run-dir" => run_dir = Some(PathBuf::from(value()?)),
            "--vmm" => vmm = Some(PathBuf::from(value()?)),
            "--config" => config = Some(PathBuf::from(value()?)),
            "--cgroup-root" => cg.root = value()?.into(),
            "--cgroup-parent" => cg.parent = value()?.into(),
            "--vmm-overhead-mib" => cg.vmm_overhead_mib = number(&flag, &value()?)?,
            "--pids-max" => cg.pids_max = number(&flag, &value()?)?,
            "--nofile" => rl.nofile = number(&flag, &value()?)?,
            "--fsize-mib" => rl.fsize = Some(number(&flag, &value()?)?.saturating_mul(1 << 20)),
            "--nproc" => rl.nproc = number(&flag, &value()?)?,
            "--new-net" => new_net = true,
            "--remove" => remove = true,
            "--wait" => wait = true,
            other => return Err(format!("unexpected argument {other:?} (see --help)")),
        }
    }
    let id = id.ok_or("--id is required")?;
    let base = base.ok_or("--base is required")?;
    if remove {
        return jailer::remove(&base, &id, &cg).map_err(|e| e.to_string());
    }
    let cfg = JailConfig {
        id,
        uid: uid.ok_or("--uid is required")?,
        gid: gid.ok_or("--gid is required")?,
        base,
        run_dir,
        vmm: vmm.ok_or("--vmm is required")?,
        config: config.ok_or("--config is required")?,
        cgroup: cg,
        rlimits: rl,
        new_net,
    };
    let started = jailer::start(&cfg).map_err(|e| e.to_string())?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{} {}", started.pid, started.start_time);
        let _ = out.flush();
    }
    if wait {
        // Closed: the caller's read of the pid line ends.
        // SAFETY: closes standard output, which nothing writes after this.
        unsafe { libc::close(1) };
        jailer::wait_and_forward(started.pid);
    }
    Ok(())
}
