//! `vsock-probe`: the host side of reddog's hybrid vsock, for nested tests.
//!
//! - `vsock-probe listen <socket> <reply>`: accept one connection on the unix
//!   socket (`<uds>_<port>`, where guest connections to the host arrive), read a
//!   line, print `got=<line>`, answer `<reply>`.
//! - `vsock-probe connect <uds> <port> <line>`: connect to the VMM's socket,
//!   send `CONNECT <port>`, expect `OK ...`, send `<line>`, print the guest's
//!   answer. Retries for 60 s while the guest is not listening yet.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

fn read_line(s: &UnixStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

fn listen(path: &str, reply: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| format!("bind {path}: {e}"))?;
    println!("listening on {path}");
    let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let line = read_line(&s).map_err(|e| format!("read: {e}"))?;
    println!("got={line}");
    s.write_all(format!("{reply}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    Ok(())
}

fn connect(uds: &str, port: &str, line: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        match try_connect(uds, port, line) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("gave up after 60 s: {last}"))
}

fn try_connect(uds: &str, port: &str, line: &str) -> Result<(), String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {uds}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let ok = read_line(&s).map_err(|e| format!("read OK: {e}"))?;
    if !ok.starts_with("OK ") {
        return Err(format!(
            "no OK from the VMM (got {ok:?}): guest not listening yet?"
        ));
    }
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let reply = read_line(&s).map_err(|e| format!("read reply: {e}"))?;
    println!("ok={ok} reply={reply}");
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["listen", path, reply] => listen(path, reply),
        ["connect", uds, port, line] => connect(uds, port, line),
        _ => Err("usage: vsock-probe listen <socket> <reply> | connect <uds> <port> <line>".into()),
    };
    if let Err(e) = result {
        eprintln!("vsock-probe: {e}");
        std::process::exit(1);
    }
}
