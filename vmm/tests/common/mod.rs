//! Helpers shared by the VMM's integration tests: run `reddog-vmm` on the tiny
//! test guest and collect what it printed and how it ended.

#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use vmm_api::ExitReport;

pub use testkit::kvm::require_kvm;
pub use testkit::test_guest::{Cmdline, Exit, HbMode};

/// What a VMM run left behind.
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub report: Option<ExitReport>,
}

impl Run {
    /// The value after `key: ` on the first console line that starts with it.
    pub fn line(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}: ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    /// Every console line that starts with `key: `.
    pub fn lines(&self, key: &str) -> Vec<&str> {
        let prefix = format!("{key}: ");
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .collect()
    }

    pub fn describe(&self) -> String {
        format!(
            "status {}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `reddog-vmm` with `args`.
pub fn vmm(args: &[&str]) -> Run {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_reddog-vmm"))
        .args(args)
        .output()
        .expect("spawn reddog-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok());
    Run {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
        report,
    }
}

/// Boots `kernel` with `cmdline` and extra flags; a 20 s limit keeps a broken
/// guest from hanging the suite.
pub fn boot(kernel: &Path, cmdline: &Cmdline, extra: &[&str]) -> Run {
    require_kvm();
    let k = kernel.to_str().unwrap();
    let cmdline = cmdline.to_string();
    let mut args = vec![
        "--kernel",
        k,
        "--cmdline",
        &cmdline,
        "--timeout-ms",
        "20000",
    ];
    args.extend_from_slice(extra);
    vmm(&args)
}
