//! Fetches (or finds in the cache) Debian's cloud kernel and prints where its
//! pieces are: `cargo run -p testkit --example fetch-kernel`.

use std::process::ExitCode;

fn main() -> ExitCode {
    match testkit::debian_kernel() {
        Ok(k) => {
            println!("package  {} {}", k.package, k.version);
            println!("release  {}", k.release);
            println!("sha256   {}", k.deb_sha256);
            println!("vmlinuz  {}", k.vmlinuz.display());
            println!("vmlinux  {:?}", k.vmlinux);
            println!("entries  {}", k.entries());
            println!("modules  {}", k.modules_dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
