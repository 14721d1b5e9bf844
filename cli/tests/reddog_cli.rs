//! `reddog image` is the image tool mounted under the user-facing CLI: the vhd
//! crate's disk commands plus guest-image's kernel, initramfs and os-base.

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

#[test]
fn image_guest_artifact_commands_have_help() {
    for (cmd, wants) in [
        ("kernel", "--cache"),
        ("initramfs", "--guest-agent"),
        ("os-base", "--guest-agent"),
    ] {
        let out = reddog(&["image", cmd, "--help"]);
        assert!(out.status.success(), "{cmd} --help: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(wants), "{cmd} --help lacks {wants}: {text}");
    }
    let list = reddog(&["image", "--help"]);
    let text = String::from_utf8_lossy(&list.stdout);
    for cmd in ["create", "convert", "kernel", "initramfs", "os-base"] {
        assert!(text.contains(cmd), "image --help lacks {cmd}: {text}");
    }
}

#[test]
fn image_initramfs_refuses_a_dynamic_guest_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("initrd.cpio");
    // The reddog binary itself is dynamically linked.
    let out = reddog(&[
        "image",
        "initramfs",
        "--guest-agent",
        env!("CARGO_BIN_EXE_reddog"),
        "-o",
        out_file.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dynamically linked"), "{err}");
    assert!(err.contains("crt-static"), "{err}");
    assert!(!out_file.exists());
}

/// Builds an initramfs from the cached Debian kernel (fetched on first use,
/// ~11 s) with the static busybox standing in for the static reddog-guest,
/// and checks the archive with busybox's cpio.
#[test]
fn image_kernel_and_initramfs_build_the_guest_initramfs() {
    let kernel = reddog(&["image", "kernel"]);
    assert!(
        kernel.status.success(),
        "image kernel: {}",
        String::from_utf8_lossy(&kernel.stderr)
    );
    let k: serde_json::Value = serde_json::from_slice(&kernel.stdout).expect("kernel JSON");
    for key in ["bzimage", "vmlinux", "modules_dir"] {
        let p = k[key].as_str().unwrap_or_else(|| panic!("no {key} in {k}"));
        assert!(std::path::Path::new(p).exists(), "{key} {p} is missing");
    }

    let busybox = testkit::artifacts::busybox_static().expect("busybox-static");
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = dir.path().join("initrd.cpio");
    let out = reddog(&[
        "image",
        "initramfs",
        "--guest-agent",
        busybox.to_str().expect("utf-8"),
        "-o",
        initrd.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "image initramfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary JSON");
    assert_eq!(summary["kernel_release"], k["release"]);
    let modules: Vec<&str> = summary["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    for m in guest_image::GUEST_MODULES {
        assert!(modules.contains(&m), "{m} not in {modules:?}");
    }

    let x = dir.path().join("x");
    std::fs::create_dir(&x).expect("mkdir");
    let status = Command::new(&busybox)
        .args(["cpio", "-i", "-d", "-F"])
        .arg(&initrd)
        .current_dir(&x)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("busybox cpio");
    assert!(status.success());
    assert_eq!(
        std::fs::read(x.join("init")).expect("init"),
        std::fs::read(&busybox).expect("busybox")
    );
    let list = std::fs::read_to_string(x.join("etc/reddog/modules")).expect("module list");
    let listed: Vec<&str> = list.lines().collect();
    assert_eq!(listed.len(), modules.len(), "{list}");
    for (line, m) in listed.iter().zip(&modules) {
        assert_eq!(*line, format!("/lib/modules/{m}.ko"));
        assert!(x.join(&line[1..]).is_file(), "{line} not in the archive");
    }
}
