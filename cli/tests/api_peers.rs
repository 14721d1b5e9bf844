//! The unix socket checks its peers (`SO_PEERCRED`): a user who can reach
//! the socket file but is not on the allow-list gets `403` and is logged;
//! on the list it is served. The peer is `reddog` run as `nobody`
//! (uid/gid 65534); the test runs as root (CI does).

use testkit::agent_harness::daemon::{wait_for_socket, Daemon};

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

const NOBODY: u32 = 65534;

fn start(
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> (Daemon, std::path::PathBuf, std::path::PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_reddog-agent"))
        .arg("--fake")
        .arg("--state-dir")
        .arg(dir.join(format!("{name}-state")))
        .arg("--api-socket")
        .arg(&sock)
        .args(["--api-socket-group", &NOBODY.to_string()])
        .args(extra)
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn reddog-agent");
    let d = Daemon(child);
    wait_for_socket(&sock);
    (d, sock, log)
}

/// `reddog --socket SOCK node` as nobody: (success, stderr).
fn as_nobody(cli: &Path, sock: &Path) -> (bool, String) {
    let out = Command::new(cli)
        .arg("--socket")
        .arg(sock)
        .arg("node")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run reddog as nobody");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_peer_not_on_the_allow_list_is_refused_with_403() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "this test runs as root (it runs reddog as nobody)"
    );
    let dir = tempfile::Builder::new()
        .prefix("rdg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    // nobody may enter the directory and run the CLI.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cli = dir.path().join("reddog");
    std::fs::copy(env!("CARGO_BIN_EXE_reddog"), &cli).expect("copy reddog");

    let (d, sock, log) = start(dir.path(), "closed", &[]);
    let m = std::fs::metadata(&sock).expect("stat socket");
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), NOBODY, "the socket's group");
    let (ok, err) = as_nobody(&cli, &sock);
    assert!(!ok, "nobody was let in");
    assert!(err.contains("403"), "{err}");
    assert!(
        err.contains("uid 65534") && err.contains("not allowed"),
        "{err}"
    );
    drop(d);
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(
        logged.contains("peer uid 65534") && logged.contains("not allowed"),
        "the refusal is logged: {logged}"
    );

    // On the list (by gid, then by uid): served.
    for flag in ["--api-allow-gid", "--api-allow-uid"] {
        let (_d, sock, _) = start(dir.path(), &flag[12..], &[flag, "65534"]);
        let (ok, err) = as_nobody(&cli, &sock);
        assert!(ok, "{flag}: {err}");
    }
}
