//! The jail itself: host preparation, namespaces, the jail root, the fork
//! and the jailed child's last steps before `exec`.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::{CapabilitySet, CapabilitySets, UnshareFlags};
use vmm_api::{DiskFormat, SerialOutput, TapConfig, VmConfig};

use crate::{cgroup, inside, JailConfig, JailError, Layout, DEFAULT_LOG_FSIZE};

/// A started jailed VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// Its pid (in the host's pid namespace).
    pub pid: i32,
    /// Its start time (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// Its jail.
    pub layout: Layout,
}

fn sys(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> JailError {
    let what = what.into();
    move |e| JailError::Sys {
        what,
        source: e.into(),
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Whether `uid`/`gid` (no supplementary groups) may `want` (4 read, 2
/// write, 1 execute) the file by its mode bits.
fn permitted(m: &std::fs::Metadata, uid: u32, gid: u32, want: u32) -> bool {
    let mode = m.mode();
    let bits = if m.uid() == uid {
        mode >> 6
    } else if m.gid() == gid {
        mode >> 3
    } else {
        mode
    };
    bits & want == want
}

/// What goes into the jail root.
#[derive(Debug)]
struct Bind {
    src: PathBuf,
    /// The path in the jail, absolute.
    dst: String,
    dir: bool,
    read_only: bool,
    exec: bool,
}

/// A host file the VM may only read: a regular file the VM's uid can read
/// by its mode (the jail grants no group or ACL).
fn read_only_input(path: &Path, what: &str, uid: u32, gid: u32) -> Result<(), JailError> {
    let m = std::fs::metadata(path).map_err(io("cannot stat", path))?;
    if !m.is_file() {
        return Err(JailError::Invalid(format!(
            "{what} {} is not a regular file",
            path.display()
        )));
    }
    if !permitted(&m, uid, gid, 4) {
        return Err(JailError::Invalid(format!(
            "{what} {} is not readable by the VM's uid {uid} (mode {:o}); make it world-readable \
             (chmod o+r): the jail reads it as that uid",
            path.display(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// An ELF without a `PT_INTERP` program header: statically linked.
fn is_static_elf(path: &Path) -> Result<bool, JailError> {
    let mut f = std::fs::File::open(path).map_err(io("cannot open", path))?;
    let mut h = [0u8; 64];
    f.read_exact(&mut h).map_err(io("cannot read", path))?;
    if &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return Err(JailError::Invalid(format!(
            "{} is not a 64-bit little-endian ELF",
            path.display()
        )));
    }
    let phoff = u64::from_le_bytes(h[32..40].try_into().unwrap_or_default());
    let phentsize = u64::from(u16::from_le_bytes([h[54], h[55]]));
    let phnum = u64::from(u16::from_le_bytes([h[56], h[57]]));
    if phentsize < 56 || phnum > 128 {
        return Err(JailError::Invalid(format!(
            "{}: unexpected ELF program headers",
            path.display()
        )));
    }
    let mut ph = vec![0u8; usize::try_from(phentsize * phnum).unwrap_or(0)];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(phoff))
        .map_err(io("cannot read", path))?;
    f.read_exact(&mut ph).map_err(io("cannot read", path))?;
    const PT_INTERP: u32 = 3;
    Ok(ph
        .chunks(usize::try_from(phentsize).unwrap_or(56))
        .all(|e| u32::from_le_bytes([e[0], e[1], e[2], e[3]]) != PT_INTERP))
}

/// How large a writable disk file can grow: a raw image stays its size; a
/// qcow2 or VHD image up to its virtual size plus metadata.
fn disk_growth_bound(path: &Path, format: DiskFormat) -> Result<u64, JailError> {
    let mut f = std::fs::File::open(path).map_err(io("cannot open", path))?;
    let len = f.metadata().map_err(io("cannot stat", path))?.len();
    let virt = match format {
        DiskFormat::Raw => return Ok(len),
        DiskFormat::Qcow2 => {
            let mut h = [0u8; 32];
            f.read_exact(&mut h).map_err(io("cannot read", path))?;
            u64::from_be_bytes(h[24..32].try_into().unwrap_or_default())
        }
        DiskFormat::Vhd => {
            let mut footer = [0u8; 512];
            let at = len.checked_sub(512).ok_or_else(|| {
                JailError::Invalid(format!("{} is too short for a VHD", path.display()))
            })?;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(at))
                .map_err(io("cannot read", path))?;
            f.read_exact(&mut footer).map_err(io("cannot read", path))?;
            u64::from_be_bytes(footer[48..56].try_into().unwrap_or_default())
        }
    };
    Ok(len.max(virt.saturating_add(virt / 16).saturating_add(64 << 20)))
}

/// The jail plan: the rewritten config and what to mount.
struct Plan {
    vm: VmConfig,
    binds: Vec<Bind>,
    dev_tun: bool,
    keep_fds: Vec<i32>,
    fsize: u64,
}

fn in_run_dir(p: &Path, run_dir: &Path, what: &str) -> Result<String, JailError> {
    match (p.parent(), p.file_name().and_then(|n| n.to_str())) {
        (Some(parent), Some(name)) if parent == run_dir => Ok(format!("{}/{name}", inside::RUN)),
        _ => Err(JailError::Invalid(format!(
            "{what} {} must lie directly in the run directory {}",
            p.display(),
            run_dir.display()
        ))),
    }
}

fn plan(cfg: &JailConfig, layout: &Layout, host: &VmConfig) -> Result<Plan, JailError> {
    let (uid, gid) = (cfg.uid, cfg.gid);
    let mut vm = host.clone();
    let mut binds = Vec::new();
    let mut bind = |src: &Path, dst: String, read_only: bool| {
        binds.push(Bind {
            src: src.to_owned(),
            dst,
            dir: false,
            read_only,
            exec: false,
        })
    };

    read_only_input(&cfg.vmm, "the VMM binary", uid, gid)?;
    let m = std::fs::metadata(&cfg.vmm).map_err(io("cannot stat", &cfg.vmm))?;
    if !permitted(&m, uid, gid, 1) {
        return Err(JailError::Invalid(format!(
            "the VMM binary {} is not executable by uid {uid}",
            cfg.vmm.display()
        )));
    }
    if !is_static_elf(&cfg.vmm)? {
        return Err(JailError::Invalid(format!(
            "the VMM binary {} is dynamically linked; the jail holds no libraries: build it with \
             RUSTFLAGS=\"-C target-feature=+crt-static\"",
            cfg.vmm.display()
        )));
    }

    read_only_input(&host.kernel, "the kernel", uid, gid)?;
    bind(&host.kernel, inside::KERNEL.into(), true);
    vm.kernel = inside::KERNEL.into();
    if let Some(i) = &host.initrd {
        read_only_input(i, "the initrd", uid, gid)?;
        bind(i, inside::INITRD.into(), true);
        vm.initrd = Some(inside::INITRD.into());
    }

    let mut fsize = DEFAULT_LOG_FSIZE;
    for (i, (d, out)) in host.disks.iter().zip(vm.disks.iter_mut()).enumerate() {
        let dst = format!("/disk{i}");
        if d.read_only {
            let m = std::fs::metadata(&d.path).map_err(io("cannot stat", &d.path))?;
            if m.is_file() && !permitted(&m, uid, gid, 4) {
                // An instance's own read-only disk (the agent's role disk is
                // 0600 root in a 0700 directory): handed to the VM's uid,
                // read-only by mode and by its read-only bind mount.
                rustix::fs::chown(&d.path, Some(uid_of(uid)), Some(gid_of(gid)))
                    .map_err(sys(format!("cannot chown disk {}", d.path.display())))?;
                std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(0o400))
                    .map_err(io("cannot chmod", &d.path))?;
            }
            read_only_input(&d.path, "disk", uid, gid)?;
        } else {
            // The VM's own disk: owned by its uid.
            let m = std::fs::metadata(&d.path).map_err(io("cannot stat", &d.path))?;
            if !m.is_file() {
                return Err(JailError::Invalid(format!(
                    "disk {} is not a regular file",
                    d.path.display()
                )));
            }
            rustix::fs::chown(&d.path, Some(uid_of(uid)), Some(gid_of(gid)))
                .map_err(sys(format!("cannot chown disk {}", d.path.display())))?;
            std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(0o600))
                .map_err(io("cannot chmod", &d.path))?;
            fsize = fsize.max(disk_growth_bound(&d.path, d.format)?);
        }
        bind(&d.path, dst.clone(), d.read_only);
        out.path = dst.clone().into();
        if let (Some(b), Some(ob)) = (&d.backing, out.backing.as_mut()) {
            read_only_input(&b.path, "backing image", uid, gid)?;
            let bdst = format!("{dst}.base");
            bind(&b.path, bdst.clone(), true);
            ob.path = bdst.into();
        }
    }

    if let SerialOutput::File(p) = &host.serial {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .map_err(io("cannot open the serial log", p))?;
        rustix::fs::fchown(&f, Some(uid_of(uid)), Some(gid_of(gid)))
            .map_err(sys(format!("cannot chown {}", p.display())))?;
        bind(p, inside::SERIAL.into(), false);
        vm.serial = SerialOutput::File(inside::SERIAL.into());
    }

    if let Some(s) = &host.api_sock {
        vm.api_sock = Some(in_run_dir(s, &layout.run_dir, "api_sock")?.into());
    }
    if let (Some(v), Some(ov)) = (&host.vsock, vm.vsock.as_mut()) {
        ov.uds_path = in_run_dir(&v.uds_path, &layout.run_dir, "the vsock socket")?.into();
    }
    let mut dev_tun = false;
    let mut keep_fds = vec![0, 1, 2];
    for n in &host.net {
        match &n.tap {
            TapConfig::Name(name) if cfg.new_net => {
                return Err(JailError::Invalid(format!(
                    "TAP {name:?} by name cannot be opened in the jail's new network namespace; \
                     pass it as an fd"
                )))
            }
            TapConfig::Name(_) => dev_tun = true,
            TapConfig::Fd(fd) => keep_fds.push(*fd),
        }
    }
    binds.push(Bind {
        src: layout.run_dir.clone(),
        dst: inside::RUN.into(),
        dir: true,
        read_only: false,
        exec: false,
    });
    binds.push(Bind {
        src: cfg.vmm.clone(),
        dst: inside::VMM.into(),
        dir: false,
        read_only: true,
        exec: true,
    });
    vm.validate()?;
    Ok(Plan {
        vm,
        binds,
        dev_tun,
        keep_fds,
        fsize: cfg.rlimits.fsize.unwrap_or(fsize),
    })
}

fn uid_of(u: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(u)
}

fn gid_of(g: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(g)
}

/// `/proc/<pid>/stat` field 22.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Host-side directories: the jail directory (root's, 0700), the empty root
/// mount point, the run directory (root and the VM's group, sticky 01770:
/// the VM makes its sockets there but cannot replace root's).
fn prepare_dirs(cfg: &JailConfig, layout: &Layout) -> Result<(), JailError> {
    std::fs::create_dir_all(&cfg.base).map_err(io("cannot create", &cfg.base))?;
    match std::fs::create_dir(&layout.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create", &layout.dir)(e)),
    }
    let m = std::fs::symlink_metadata(&layout.dir).map_err(io("cannot stat", &layout.dir))?;
    if !m.is_dir() || m.uid() != 0 {
        return Err(JailError::Invalid(format!(
            "{} must be a directory owned by root",
            layout.dir.display()
        )));
    }
    std::fs::set_permissions(&layout.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("cannot chmod", &layout.dir))?;
    let _ = std::fs::remove_file(&layout.pid_file);
    match std::fs::create_dir(&layout.root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create", &layout.root)(e)),
    }
    std::fs::create_dir_all(&layout.run_dir).map_err(io("cannot create", &layout.run_dir))?;
    let m =
        std::fs::symlink_metadata(&layout.run_dir).map_err(io("cannot stat", &layout.run_dir))?;
    if !m.is_dir() {
        return Err(JailError::Invalid(format!(
            "the run directory {} is not a directory",
            layout.run_dir.display()
        )));
    }
    rustix::fs::chown(&layout.run_dir, Some(uid_of(0)), Some(gid_of(cfg.gid)))
        .map_err(sys(format!("cannot chown {}", layout.run_dir.display())))?;
    std::fs::set_permissions(&layout.run_dir, std::fs::Permissions::from_mode(0o1770))
        .map_err(io("cannot chmod", &layout.run_dir))?;
    let _ = std::fs::remove_file(layout.exit_report());
    Ok(())
}

/// Builds the jail root on `root` (in the new mount namespace): a tmpfs with
/// the binds, the device nodes and the config, then made read-only.
fn build_root(cfg: &JailConfig, root: &Path, plan: &Plan) -> Result<(), JailError> {
    rustix::mount::mount(
        "reddog-jail",
        root,
        "tmpfs",
        MountFlags::NOSUID,
        Some(c"mode=0755,size=1m,nr_inodes=64"),
    )
    .map_err(sys("cannot mount the jail's tmpfs"))?;
    for b in &plan.binds {
        let dst = root.join(b.dst.trim_start_matches('/'));
        if b.dir {
            std::fs::create_dir(&dst).map_err(io("cannot create", &dst))?;
        } else {
            std::fs::File::create(&dst).map_err(io("cannot create", &dst))?;
        }
        rustix::mount::mount_bind(&b.src, &dst).map_err(sys(format!(
            "cannot bind {} to {}",
            b.src.display(),
            b.dst
        )))?;
        let mut flags = MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV;
        if b.read_only {
            flags |= MountFlags::RDONLY;
        }
        if !b.exec {
            flags |= MountFlags::NOEXEC;
        }
        rustix::mount::mount_remount(&dst, flags, c"")
            .map_err(sys(format!("cannot remount {}", b.dst)))?;
    }
    let dev = root.join("dev");
    std::fs::create_dir(&dev).map_err(io("cannot create", &dev))?;
    let mut nodes = vec![("kvm", 10, 232)];
    if plan.dev_tun {
        std::fs::create_dir(dev.join("net")).map_err(io("cannot create", &dev))?;
        nodes.push(("net/tun", 10, 200));
    }
    for (name, major, minor) in nodes {
        let p = dev.join(name);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            rustix::fs::makedev(major, minor),
        )
        .map_err(sys(format!("cannot make /dev/{name}")))?;
        rustix::fs::chown(&p, Some(uid_of(cfg.uid)), Some(gid_of(cfg.gid)))
            .map_err(sys(format!("cannot chown /dev/{name}")))?;
    }
    let json = serde_json::to_vec_pretty(&plan.vm)
        .map_err(|e| JailError::Invalid(format!("cannot encode the VM config: {e}")))?;
    let cfg_path = root.join(inside::CONFIG.trim_start_matches('/'));
    std::fs::write(&cfg_path, json).map_err(io("cannot write", &cfg_path))?;
    std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o444))
        .map_err(io("cannot chmod", &cfg_path))?;
    rustix::mount::mount_remount(root, MountFlags::RDONLY | MountFlags::NOSUID, c"")
        .map_err(sys("cannot make the jail root read-only"))?;
    Ok(())
}

/// Starts `cfg.vmm` jailed; returns once it runs (`exec`ed) with its pid,
/// which is also in the jail's pid file.
pub fn start(cfg: &JailConfig) -> Result<Started, JailError> {
    crate::check_id(&cfg.id)?;
    if cfg.uid == 0 || cfg.gid == 0 {
        return Err(JailError::Invalid(format!(
            "uid {} / gid {}: a jailed VMM never runs as root (uid or gid 0); give it its own ids",
            cfg.uid, cfg.gid
        )));
    }
    if !cfg.base.is_absolute() || !cfg.vmm.is_absolute() {
        return Err(JailError::Invalid(
            "the jail base and the VMM binary must be absolute paths".into(),
        ));
    }
    if !rustix::process::geteuid().is_root() {
        return Err(JailError::Invalid(
            "reddog-jailer must run as root (it creates namespaces, mounts and cgroups)".into(),
        ));
    }
    let host = VmConfig::from_file(&cfg.config)?;
    let layout = Layout::new(&cfg.base, &cfg.id, cfg.run_dir.as_deref());
    prepare_dirs(cfg, &layout)?;
    let plan = plan(cfg, &layout, &host)?;

    let cg = cfg.cgroup.cgroup(&cfg.id)?;
    let limits = cgroup::Limits {
        cpus: u64::from(host.vcpus),
        memory_bytes: (u64::from(host.memory_mib) + cfg.cgroup.vmm_overhead_mib) << 20,
        pids: cfg.cgroup.pids_max,
    };
    cg.create(&limits)?;
    cg.join_self()?;

    let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(sys("cannot make a pipe"))?;
    // Only the child's children-to-be get the new pid namespace: the child
    // is its pid 1. Everything else is unshared in the child, so the jailer
    // itself stays in the host's namespaces (`pivot_root` changes the root
    // of every process of a mount namespace).
    // SAFETY: NEWPID changes no memory and takes effect at the next fork.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWPID) }
        .map_err(sys("cannot unshare the pid namespace"))?;

    // Everything the child needs, allocated before the fork.
    let argv = [
        inside::VMM,
        "--config",
        inside::CONFIG,
        "--exit-report",
        inside::EXIT_REPORT,
    ]
    .map(|a| CString::new(a).unwrap_or_default());
    let root = CString::new(layout.root.as_os_str().as_encoded_bytes())
        .map_err(|_| JailError::Invalid("the jail root path holds a NUL byte".into()))?;
    let mut keep = plan.keep_fds.clone();
    keep.push(err_w.as_raw_fd());

    // SAFETY: the jailer is single-threaded, so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::Sys {
            what: "cannot fork".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        drop(err_r);
        let e = child(cfg, &root, &argv, &keep, &plan);
        let mut w = std::fs::File::from(err_w);
        let _ = w.write_all(e.to_string().as_bytes());
        // SAFETY: ends the child without running the parent's atexit work.
        unsafe { libc::_exit(127) };
    }
    drop(err_w);
    // Read now: alive, or a zombie until we exit, so its stat is there.
    let start_time = start_time(pid).unwrap_or(0);
    let mut msg = String::new();
    let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
    if !msg.is_empty() {
        let mut status = 0;
        // SAFETY: reaps our own child; `status` is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(JailError::Child(msg));
    }
    let tmp = layout.dir.join(".vmm.pid.tmp");
    std::fs::write(&tmp, format!("{pid} {start_time}\n")).map_err(io("cannot write", &tmp))?;
    std::fs::rename(&tmp, &layout.pid_file).map_err(io("cannot write", &layout.pid_file))?;
    Ok(Started {
        pid,
        start_time,
        layout,
    })
}

/// The jailed child's last steps; returns only on failure.
fn child(
    cfg: &JailConfig,
    root: &CString,
    argv: &[CString; 5],
    keep: &[i32],
    plan: &Plan,
) -> JailError {
    match enter_namespaces(cfg, root, plan).and_then(|()| child_steps(cfg, root, keep, plan)) {
        Err(e) => e,
        Ok(()) => {
            let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
            ptrs.push(std::ptr::null());
            let envp: [*const libc::c_char; 1] = [std::ptr::null()];
            // SAFETY: NUL-terminated argv and (empty) envp arrays of valid C
            // strings that outlive the call.
            unsafe { libc::execve(argv[0].as_ptr(), ptrs.as_ptr(), envp.as_ptr()) };
            JailError::Sys {
                what: format!("cannot exec {} in the jail", inside::VMM),
                source: std::io::Error::last_os_error(),
            }
        }
    }
}

/// New mount, ipc and uts (and net) namespaces for the child, and its jail
/// root built in the new mount namespace.
fn enter_namespaces(cfg: &JailConfig, root: &CString, plan: &Plan) -> Result<(), JailError> {
    let mut flags = UnshareFlags::NEWNS | UnshareFlags::NEWIPC | UnshareFlags::NEWUTS;
    if cfg.new_net {
        flags |= UnshareFlags::NEWNET;
    }
    // SAFETY: unsharing changes no memory; NEWNS needs a single-threaded
    // caller (no CLONE_FS sharing), which the forked child is.
    unsafe { rustix::thread::unshare_unsafe(flags) }.map_err(sys("cannot unshare namespaces"))?;
    // Nothing mounted from here on reaches the host.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(sys("cannot make the mounts private"))?;
    let root = Path::new(std::ffi::OsStr::from_bytes(root.as_bytes()));
    build_root(cfg, root, plan)
}

fn close_stray_fds(keep: &[i32]) -> Result<(), JailError> {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(io("cannot list", Path::new("/proc/self/fd")))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if !keep.contains(&fd) {
            // SAFETY: closes a descriptor nothing in this process uses
            // after the exec (the listing's own one is closed already: EBADF).
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

fn child_steps(
    cfg: &JailConfig,
    root: &CString,
    keep: &[i32],
    plan: &Plan,
) -> Result<(), JailError> {
    use rustix::process::{Resource, Rlimit};
    let host = cfg.id.as_bytes();
    rustix::system::sethostname(&host[..host.len().min(64)])
        .map_err(sys("cannot set the hostname"))?;
    rustix::process::setsid().map_err(sys("cannot start a session"))?;
    // The VMM's standard output is its log (the jailer's standard error): the
    // jailer's own standard output carries only the pid to its caller.
    // SAFETY: duplicates one open descriptor over another.
    if unsafe { libc::dup2(2, 1) } < 0 {
        return Err(last("dup2"));
    }
    close_stray_fds(keep)?;

    rustix::process::chdir(root.as_c_str()).map_err(sys("cannot enter the jail root"))?;
    // The old root is stacked under the new one and detached at once.
    rustix::process::pivot_root(".", ".").map_err(sys("pivot_root into the jail failed"))?;
    rustix::mount::unmount(".", UnmountFlags::DETACH).map_err(sys("cannot detach the old root"))?;
    rustix::process::chdir("/").map_err(sys("cannot chdir to /"))?;

    let limit = |n: u64| Rlimit {
        current: Some(n),
        maximum: Some(n),
    };
    for (r, n, what) in [
        (Resource::Nofile, cfg.rlimits.nofile, "RLIMIT_NOFILE"),
        (Resource::Fsize, plan.fsize, "RLIMIT_FSIZE"),
        (Resource::Nproc, cfg.rlimits.nproc, "RLIMIT_NPROC"),
        (Resource::Core, 0, "RLIMIT_CORE"),
    ] {
        rustix::process::setrlimit(r, limit(n)).map_err(sys(format!("cannot set {what}")))?;
    }

    for c in CapabilitySet::all().iter() {
        match rustix::thread::remove_capability_from_bounding_set(c) {
            // A capability this kernel does not know.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(sys("cannot drop a bounding capability")(e)),
        }
    }
    rustix::thread::clear_ambient_capability_set()
        .map_err(sys("cannot clear ambient capabilities"))?;
    // SAFETY: plain syscalls on this (the only) thread's credentials.
    let r = unsafe { libc::setgroups(0, std::ptr::null()) };
    if r != 0 {
        return Err(last("setgroups"));
    }
    // SAFETY: as above.
    if unsafe { libc::setresgid(cfg.gid, cfg.gid, cfg.gid) } != 0 {
        return Err(last("setresgid"));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(cfg.uid, cfg.uid, cfg.uid) } != 0 {
        return Err(last("setresuid"));
    }
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(sys("cannot clear capabilities"))?;
    rustix::thread::set_no_new_privs(true).map_err(sys("cannot set no_new_privs"))?;
    Ok(())
}

fn last(what: &str) -> JailError {
    JailError::Sys {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// Waits for the jailed VMM (the jailer's child) and ends the same way: its
/// exit status, or killed by its signal. The thin parent a caller can `wait`
/// on to learn how the VMM ended.
pub fn wait_and_forward(pid: i32) -> ! {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(125);
        }
    }
    if libc::WIFEXITED(status) {
        std::process::exit(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Core,
            rustix::process::Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        );
        // SAFETY: restores the default action of one signal and raises it on
        // this process, which then ends as the VMM did.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    }
    std::process::exit(125)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_follow_owner_group_other() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        std::fs::write(&p, "x").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let m = std::fs::metadata(&p).expect("stat");
        assert!(permitted(&m, m.uid(), 12345, 4));
        assert!(permitted(&m, 12345, m.gid(), 4));
        assert!(!permitted(&m, 12345, 12345, 4));
        assert!(!permitted(&m, 12345, m.gid(), 2));
    }

    #[test]
    fn qcow2_growth_bound_reads_the_virtual_size() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("q");
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        std::fs::write(&p, &h).expect("write");
        let b = disk_growth_bound(&p, DiskFormat::Qcow2).expect("bound");
        assert!(b > 1 << 30, "{b}");
        assert_eq!(disk_growth_bound(&p, DiskFormat::Raw).expect("raw"), 512);
    }

    #[test]
    fn sockets_must_lie_in_the_run_dir() {
        let run = Path::new("/s/run/vm");
        assert_eq!(
            in_run_dir(Path::new("/s/run/vm/api.sock"), run, "x").expect("in"),
            "/run/api.sock"
        );
        assert!(in_run_dir(Path::new("/s/run/api.sock"), run, "x").is_err());
        assert!(in_run_dir(Path::new("/s/run/vm/a/b.sock"), run, "x").is_err());
    }
}
