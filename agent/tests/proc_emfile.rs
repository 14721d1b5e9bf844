//! A full fd table (`EMFILE`) must never make the agent take a running VMM
//! for exited. One test in its own binary (its own process): it lowers
//! `RLIMIT_NOFILE` and fills the fd table, which would disturb any test
//! running beside it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::backend::process::{
    process_start_time, ProcessLauncher, ProcessLauncherConfig, ProcessState,
};
use agent::backend::vmm::{LaunchSpec, StopMode, VmmError, VmmLauncher};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Holds the fd table full (soft limit lowered, every free fd taken) until
/// dropped, then gives everything back.
struct FullFdTable {
    held: Vec<std::fs::File>,
    old: Rlimit,
}

impl FullFdTable {
    fn fill() -> Self {
        let old = getrlimit(Resource::Nofile);
        let mut t = Self {
            held: Vec::new(),
            old,
        };
        let low = Rlimit {
            current: Some(256),
            maximum: t.old.maximum,
        };
        setrlimit(Resource::Nofile, low).expect("lower RLIMIT_NOFILE");
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => t.held.push(f),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) => {
                    break
                }
                Err(e) => panic!("filling the fd table: {e}"),
            }
            assert!(t.held.len() < 300, "RLIMIT_NOFILE was not lowered");
        }
        t
    }
}

impl Drop for FullFdTable {
    fn drop(&mut self) {
        self.held.clear();
        let _ = setrlimit(Resource::Nofile, self.old);
    }
}

fn spec(dir: &Path) -> LaunchSpec {
    LaunchSpec {
        instance_id: "a".into(),
        dir: dir.to_owned(),
        vcpus: 1,
        memory_mib: 64,
        disks: vec![],
        vsock: vmm_api::VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("v.sock"),
        },
        guest_port: 1024,
        serial_path: dir.join("serial.log"),
        net: None,
    }
}

/// A shell script standing in for reddog-vmm (no control socket).
fn fake_vmm(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("fake-vmm");
    std::fs::write(&p, "#!/bin/sh\nexec sleep 60\n").expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

#[test]
fn a_full_fd_table_never_makes_a_running_vmm_look_exited() {
    // The runtime's own fds (epoll, eventfd) are made before the table fills.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = ProcessLauncherConfig::new(fake_vmm(dir.path()), "/k");
        cfg.control_socket = false;
        cfg.boot_on_request = false;
        let l = ProcessLauncher::new(cfg);
        let s = spec(dir.path());
        let mut ours = l.launch(&s).await.expect("launch");
        let rec = ours.record();
        assert!(rec.start_time > 0);
        let me = i32::try_from(std::process::id()).expect("pid");

        let full = FullFdTable::fill();
        // The read itself fails with EMFILE: unknown, not gone.
        let st = process_start_time(rec.pid);
        assert!(
            matches!(&st, ProcessState::Unknown(why) if why.contains("Too many open files")),
            "{st:?}"
        );
        assert!(matches!(process_start_time(me), ProcessState::Unknown(_)));
        // A restarted agent adopting its VMM keeps it ...
        let mut adopted = l
            .adopt(&s, &rec)
            .await
            .expect("an unknown answer must not give up on the VMM");
        // ... and does not take it for exited while the answer stays unknown.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), adopted.wait())
                .await
                .is_err(),
            "the adopted VMM was reported exited under EMFILE"
        );
        // A search for an unrecorded VMM does not answer "none" (which would
        // start a second one over the same disks) while /proc cannot be read.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), l.recover(&s))
                .await
                .is_err(),
            "recover answered under EMFILE"
        );
        // Nor signals a pid it cannot check.
        assert!(matches!(
            adopted.stop(StopMode::Force).await,
            Err(VmmError::Signal { .. })
        ));
        drop(full);

        assert_eq!(process_start_time(rec.pid).is(rec.start_time), Some(true));
        assert!(
            tokio::time::timeout(Duration::from_millis(600), adopted.wait())
                .await
                .is_err(),
            "still running"
        );
        // With /proc readable again the search answers (the stand-in runs
        // `sleep`, not the VMM binary: none).
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), l.recover(&s))
                .await
                .expect("recover answers"),
            None
        );
        adopted.stop(StopMode::Force).await.expect("kill");
        let e = ours.wait().await;
        assert_eq!(e.signal, Some(9));
        tokio::time::timeout(Duration::from_secs(10), adopted.wait())
            .await
            .expect("the adopted VMM's exit is seen");
        assert_eq!(process_start_time(rec.pid), ProcessState::Gone);
    });
}
