//! `vmm-ctl`: drives a reddog-vmm control socket from a nested test's shell.
//!
//! `vmm-ctl <socket> shutdown-acpi|shutdown-force|ping|metrics` prints the
//! VMM's result as `ok <json>` (exit 0) or the error (exit 1); waits up to
//! 30 s for the socket to appear.

use std::path::Path;
use std::time::{Duration, Instant};

use vmm_api::control::{Client, Op, ShutdownMode};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (sock, what) = match args.as_slice() {
        [s, w] => (s.as_str(), w.as_str()),
        _ => {
            eprintln!("usage: vmm-ctl <socket> shutdown-acpi|shutdown-force|ping|metrics");
            std::process::exit(2);
        }
    };
    let op = match what {
        "shutdown-acpi" => Op::Shutdown {
            mode: ShutdownMode::Acpi,
        },
        "shutdown-force" => Op::Shutdown {
            mode: ShutdownMode::Force,
        },
        "ping" => Op::Ping,
        "metrics" => Op::Metrics,
        other => {
            eprintln!("vmm-ctl: unknown request {other:?}");
            std::process::exit(2);
        }
    };
    let t = Instant::now();
    while !Path::new(sock).exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let result = Client::connect(Path::new(sock))
        .map_err(|e| e.to_string())
        .and_then(|mut c| c.request(op).map_err(|e| e.to_string()));
    match result.map(|r| r.outcome) {
        Ok(Ok(v)) => println!("ok {v}"),
        Ok(Err(e)) => {
            eprintln!("vmm-ctl: the VMM refused: {e:?}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("vmm-ctl: {e}");
            std::process::exit(1);
        }
    }
}
