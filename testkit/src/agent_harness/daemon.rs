//! A `reddog-agent` daemon as a child process.

use std::time::Duration;

/// A `reddog-agent` child process, killed when dropped.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (at most 20 s) for the agent to create its API socket.
pub fn wait_for_socket(sock: &std::path::Path) {
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the agent did not create its socket {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
