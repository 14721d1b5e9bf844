//! `reddog image` is the vhd crate's tool, mounted under the user-facing CLI.

use std::process::Command;

fn reddog(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_reddog"))
        .args(args)
        .output()
        .expect("run reddog")
}

#[test]
fn image_create_info_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.qcow2");
    let img_s = img.to_str().expect("utf-8");
    let out = reddog(&[
        "image", "create", "--format", "qcow2", "--size", "1M", img_s,
    ]);
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(img.exists());
    let info = reddog(&["image", "info", "--format", "qcow2", img_s]);
    assert!(
        info.status.success(),
        "info: {}",
        String::from_utf8_lossy(&info.stderr)
    );

    // A qcow2 opened as VHD: a clear error, non-zero exit, no panic.
    let wrong = reddog(&["image", "info", "--format", "vhd", img_s]);
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!err.contains("panicked"), "{err}");
}
