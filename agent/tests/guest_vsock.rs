//! The real guest channel: a "guest" connects to `<uds>_<port>` as the VMM's
//! hybrid vsock would, speaks guest-proto, and misbehaves in every way the
//! protocol document lists.

use std::time::Duration;

use agent::backend::guest::{GuestChannel, GuestEndpoint, GuestEvent, HostCommand};
use agent::backend::vsock_guest::{GuestLimits, VsockGuestChannel};
use guest_proto::{
    Capabilities, Decoded, Frame, GuestMsg, Heartbeat, Hello, HostMsg, RoleState, StreamDecoder,
    MAX_FRAME_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn enc(msg: &GuestMsg<'_>) -> Vec<u8> {
    let mut out = [0u8; MAX_FRAME_LEN];
    let n = msg.encode(1, &mut out).expect("encode");
    out[..n].to_vec()
}

fn hello(caps: Capabilities) -> Vec<u8> {
    enc(&GuestMsg::Hello(Hello {
        min_version: 1,
        max_version: 1,
        boot_id: [9; 16],
        capabilities: caps,
        agent_version: "test-guest\x1b[31m",
    }))
}

fn heartbeat(seq: u64) -> Vec<u8> {
    enc(&GuestMsg::Heartbeat(Heartbeat {
        seq,
        uptime_ms: seq * 100,
        load_avg_x100: [0; 3],
        free_mem_kib: 1000,
        role_state: RoleState::Ready,
        role_restarts: 0,
    }))
}

struct T {
    _dir: tempfile::TempDir,
    ep: GuestEndpoint,
    link: agent::backend::guest::GuestLink,
}

async fn open(limits: GuestLimits) -> T {
    let dir = tempfile::Builder::new()
        .prefix("rdg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let ep = GuestEndpoint {
        uds_path: dir.path().join("v.sock"),
        port: 1024,
        heartbeat_interval_ms: 500,
    };
    let link = VsockGuestChannel::new(limits)
        .open("a", &ep)
        .await
        .expect("open");
    T {
        _dir: dir,
        ep,
        link,
    }
}

async fn next(link: &mut agent::backend::guest::GuestLink) -> GuestEvent {
    tokio::time::timeout(Duration::from_secs(20), link.events.recv())
        .await
        .expect("an event in time")
        .expect("channel open")
}

async fn read_host_msg(s: &mut UnixStream, dec: &mut StreamDecoder) -> Option<String> {
    loop {
        if let Decoded::Frame {
            frame: Frame::Known { msg, .. },
            ..
        } = dec.next_frame::<HostMsg>()
        {
            return Some(format!("{msg:?}"));
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(dec.spare_mut()))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        dec.commit(n);
    }
}

#[tokio::test]
async fn a_well_behaved_guest_session() {
    let mut t = open(GuestLimits::default()).await;
    assert!(t.ep.listen_path().ends_with("v.sock_1024"));
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&hello(Capabilities::ROLE | Capabilities::SHUTDOWN))
        .await
        .expect("write");
    let mut dec = StreamDecoder::new();
    let ack = read_host_msg(&mut s, &mut dec).await.expect("ack");
    assert!(
        ack.contains("HelloAck") && ack.contains("heartbeat_interval_ms: 500"),
        "{ack}"
    );
    match next(&mut t.link).await {
        GuestEvent::Hello {
            agent_version,
            version,
            ..
        } => {
            assert_eq!(version, 1);
            assert_eq!(
                agent_version, "test-guest\\u{1b}[31m",
                "control characters escaped"
            );
        }
        e => panic!("{e:?}"),
    }
    // Frames split across writes, byte by byte.
    let mut bytes = heartbeat(0);
    bytes.extend(enc(&GuestMsg::Ready));
    for b in bytes {
        s.write_all(&[b]).await.expect("write");
    }
    assert!(matches!(
        next(&mut t.link).await,
        GuestEvent::Heartbeat { seq: 0, .. }
    ));
    assert_eq!(next(&mut t.link).await, GuestEvent::Ready);
    // Host commands reach the guest.
    t.link
        .commands
        .send(HostCommand::Shutdown { deadline_ms: 100 })
        .await
        .expect("cmd");
    let m = read_host_msg(&mut s, &mut dec).await.expect("shutdown");
    assert!(m.contains("Shutdown"), "{m}");
    // A command without the capability is not sent; Ping needs none.
    t.link
        .commands
        .send(HostCommand::SetHeartbeatInterval(1000))
        .await
        .expect("cmd");
    t.link
        .commands
        .send(HostCommand::Ping(42))
        .await
        .expect("cmd");
    let m = read_host_msg(&mut s, &mut dec).await.expect("ping");
    assert!(m.contains("Ping") && m.contains("42"), "{m}");
    drop(s);
    assert!(matches!(
        next(&mut t.link).await,
        GuestEvent::Disconnected {
            misbehaving: false,
            ..
        }
    ));
    // The guest reconnects and starts again with Hello.
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("reconnect");
    s.write_all(&hello(Capabilities::NONE))
        .await
        .expect("write");
    assert!(matches!(next(&mut t.link).await, GuestEvent::Hello { .. }));
    // Dropping the link removes the socket.
    let path = t.ep.listen_path();
    drop(t.link);
    assert!(!path.exists());
}

async fn expect_misbehaving(t: &mut T, why: &str) {
    loop {
        match next(&mut t.link).await {
            GuestEvent::Disconnected {
                reason,
                misbehaving,
            } => {
                assert!(misbehaving, "{reason}");
                assert!(reason.contains(why), "{reason} should mention {why}");
                return;
            }
            _ => continue,
        }
    }
}

#[tokio::test]
async fn garbage_and_protocol_violations_close_the_connection() {
    let mut t = open(GuestLimits::default()).await;
    // Garbage: a framing error.
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    expect_misbehaving(&mut t, "framing").await;
    // The first frame is not Hello.
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&heartbeat(0)).await.expect("write");
    expect_misbehaving(&mut t, "not Hello").await;
    // A second Hello.
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&hello(Capabilities::NONE))
        .await
        .expect("write");
    s.write_all(&hello(Capabilities::NONE))
        .await
        .expect("write");
    expect_misbehaving(&mut t, "second Hello").await;
    // Role messages without the ROLE capability: frame errors, then closed.
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&hello(Capabilities::NONE))
        .await
        .expect("write");
    for pid in 0..12 {
        let m = enc(&GuestMsg::RoleStarted(guest_proto::RoleStarted { pid }));
        s.write_all(&m).await.expect("write");
    }
    expect_misbehaving(&mut t, "frame errors").await;
    // An oversized length field.
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&[0x52, 0x44, 1, 2, 0xff, 0xff, 0, 0])
        .await
        .expect("write");
    expect_misbehaving(&mut t, "framing").await;
}

#[tokio::test(start_paused = true)]
async fn slow_guests_time_out() {
    let mut t = open(GuestLimits::default()).await;
    // Connected, never says hello.
    let _s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    expect_misbehaving(&mut t, "no Hello").await;
    // Half a frame, then nothing.
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&hello(Capabilities::NONE))
        .await
        .expect("write");
    s.write_all(&heartbeat(1)[..10]).await.expect("write");
    expect_misbehaving(&mut t, "incomplete").await;
}

#[tokio::test]
async fn a_flooding_guest_is_throttled_then_closed() {
    let limits = GuestLimits {
        frames_per_sec: 50.0,
        frame_burst: 10.0,
        max_throttled: Duration::from_millis(500),
        ..GuestLimits::default()
    };
    let mut t = open(limits).await;
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&hello(Capabilities::NONE))
        .await
        .expect("write");
    let writer = tokio::spawn(async move {
        let mut seq = 0;
        // Bounded: the host closes the connection long before this ends.
        while seq < 100_000 {
            if s.write_all(&heartbeat(seq)).await.is_err() {
                break;
            }
            seq += 1;
        }
        seq
    });
    let start = std::time::Instant::now();
    let mut beats = 0;
    loop {
        match next(&mut t.link).await {
            GuestEvent::Heartbeat { .. } => beats += 1,
            GuestEvent::Disconnected {
                reason,
                misbehaving,
            } => {
                assert!(
                    misbehaving && reason.contains("frames per second"),
                    "{reason}"
                );
                break;
            }
            _ => {}
        }
    }
    let sent = writer.await.expect("writer");
    // Throttled: far fewer heartbeats delivered than written, at about the rate.
    assert!(beats < 200, "{beats} of {sent}");
    assert!(start.elapsed() >= Duration::from_millis(400));
}

/// Waits for the link to be closed by the flood rule; returns how long that
/// took.
async fn flood_cut_off(link: &mut agent::backend::guest::GuestLink) -> Duration {
    let start = std::time::Instant::now();
    loop {
        if let GuestEvent::Disconnected {
            reason,
            misbehaving,
        } = next(link).await
        {
            assert!(
                misbehaving && reason.contains("frames per second"),
                "closed for the wrong reason after {:?}: {reason}",
                start.elapsed()
            );
            return start.elapsed();
        }
    }
}

/// A flood whose reads end mid-frame while it is throttled is cut off by the
/// flood rule, not as "a frame stayed incomplete": frames keep completing, so
/// the partial-frame clock starts again with each one.
#[tokio::test]
async fn a_throttled_flood_is_not_mistaken_for_an_incomplete_frame() {
    let limits = GuestLimits {
        // A read's worth of frames drains in less than the partial-frame
        // limit, but the reads go on for much longer than it.
        frames_per_sec: 500.0,
        frame_burst: 10.0,
        partial_frame_timeout: Duration::from_millis(200),
        max_throttled: Duration::from_millis(1500),
        ..GuestLimits::default()
    };
    let mut t = open(limits).await;
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&hello(Capabilities::NONE))
        .await
        .expect("write");
    let writer = tokio::spawn(async move {
        // Frames written in chunks that straddle frame boundaries, so what
        // the host has read ends inside a frame most of the time.
        let mut bytes = Vec::new();
        for seq in 0..50_000 {
            bytes.extend_from_slice(&heartbeat(seq));
        }
        for chunk in bytes.chunks(37) {
            if s.write_all(chunk).await.is_err() {
                break;
            }
        }
    });
    let took = flood_cut_off(&mut t.link).await;
    assert!(
        took >= Duration::from_millis(1400),
        "cut off after {took:?}"
    );
    writer.abort();
}

/// A flood at a limit finer than the timer: each throttling sleep lasts at
/// least a millisecond, over which the bucket refills up to its burst, so
/// the next frames are let through on time. That is no break in the flood
/// (the guest always has more waiting): it is cut after `max_throttled`.
/// With the old rule (any frame let through resets the throttled clock) the
/// flood was read at the limit until it ended, never cut; the same happened
/// to the test above on a loaded machine, where sleeps overran.
#[tokio::test]
async fn a_flood_at_a_limit_finer_than_the_timer_is_still_cut_off() {
    let limits = GuestLimits {
        frames_per_sec: 20_000.0,
        frame_burst: 10.0,
        max_throttled: Duration::from_millis(1000),
        ..GuestLimits::default()
    };
    let mut t = open(limits).await;
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&hello(Capabilities::NONE))
        .await
        .expect("write");
    // 10 s of frames at the limit, written as fast as the socket takes them.
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        for seq in 0..1000 {
            batch.extend_from_slice(&heartbeat(seq));
        }
        for _ in 0..200 {
            if s.write_all(&batch).await.is_err() {
                break;
            }
        }
    });
    let took = flood_cut_off(&mut t.link).await;
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(8),
        "cut off after {took:?}"
    );
    writer.abort();
}

#[tokio::test]
async fn one_guest_flooding_does_not_delay_another() {
    let limits = GuestLimits {
        frames_per_sec: 20.0,
        frame_burst: 5.0,
        max_throttled: Duration::from_secs(30),
        ..GuestLimits::default()
    };
    let mut bad = open(limits.clone()).await;
    let mut good = open(limits).await;
    let mut bs = UnixStream::connect(bad.ep.listen_path())
        .await
        .expect("connect");
    bs.write_all(&hello(Capabilities::NONE))
        .await
        .expect("write");
    let flood = tokio::spawn(async move {
        for seq in 0..5000 {
            if bs.write_all(&heartbeat(seq)).await.is_err() {
                break;
            }
        }
    });
    let mut gs = UnixStream::connect(good.ep.listen_path())
        .await
        .expect("connect");
    let t = std::time::Instant::now();
    gs.write_all(&hello(Capabilities::NONE))
        .await
        .expect("write");
    assert!(matches!(
        next(&mut good.link).await,
        GuestEvent::Hello { .. }
    ));
    gs.write_all(&heartbeat(0)).await.expect("write");
    assert!(matches!(
        next(&mut good.link).await,
        GuestEvent::Heartbeat { .. }
    ));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Drain a little of the bad one so it makes progress, then stop.
    let _ = next(&mut bad.link).await;
    flood.abort();
}

fn hello_versions(min_version: u8, max_version: u8) -> Vec<u8> {
    let mut out = [0u8; MAX_FRAME_LEN];
    let msg = GuestMsg::Hello(Hello {
        min_version,
        max_version,
        boot_id: [7; 16],
        capabilities: Capabilities::ROLE,
        agent_version: "from-the-future",
    });
    // The guest frames its Hello with the newest version it speaks: encode the
    // payload with today's layout and put it in a frame of that version.
    let n = msg.encode(1, &mut out).expect("encode");
    let payload = out[guest_proto::HEADER_LEN..n].to_vec();
    let mut frame = [0u8; MAX_FRAME_LEN];
    let m =
        guest_proto::encode_raw_frame(max_version, guest_proto::kind::HELLO, &payload, &mut frame)
            .expect("raw frame");
    frame[..m].to_vec()
}

#[tokio::test]
async fn a_hello_from_a_newer_guest_settles_on_the_common_version() {
    let mut t = open(GuestLimits::default()).await;
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&hello_versions(1, 9)).await.expect("write");
    let mut dec = StreamDecoder::new();
    let ack = read_host_msg(&mut s, &mut dec).await.expect("ack");
    assert!(
        ack.contains("HelloAck") && ack.contains("version: 1"),
        "{ack}"
    );
    match next(&mut t.link).await {
        GuestEvent::Hello { version, .. } => assert_eq!(version, 1),
        e => panic!("{e:?}"),
    }
    // The session then works at version 1.
    s.write_all(&heartbeat(0)).await.expect("write");
    loop {
        if let GuestEvent::Heartbeat { .. } = next(&mut t.link).await {
            break;
        }
    }
}

#[tokio::test]
async fn a_hello_with_only_future_versions_is_refused() {
    let mut t = open(GuestLimits::default()).await;
    let mut s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    s.write_all(&hello_versions(5, 9)).await.expect("write");
    expect_misbehaving(&mut t, "no common protocol version").await;
}

/// A heartbeat interval changed while no guest is connected, or during a
/// connection, is what the next connection's HelloAck says.
#[tokio::test]
async fn an_interval_change_holds_for_the_next_connection() {
    let mut t = open(GuestLimits::default()).await;
    // Nobody connected yet.
    t.link
        .commands
        .send(HostCommand::SetHeartbeatInterval(1500))
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let connect_and_ack = |path: std::path::PathBuf| async move {
        let mut s = UnixStream::connect(path).await.expect("connect");
        s.write_all(&hello(Capabilities::HEARTBEAT_INTERVAL))
            .await
            .expect("write");
        let mut dec = StreamDecoder::new();
        let ack = read_host_msg(&mut s, &mut dec).await.expect("ack");
        (s, dec, ack)
    };
    let (mut s, mut dec, ack) = connect_and_ack(t.ep.listen_path()).await;
    assert!(ack.contains("heartbeat_interval_ms: 1500"), "{ack}");
    assert!(matches!(next(&mut t.link).await, GuestEvent::Hello { .. }));
    // During the connection: the guest gets the command ...
    t.link
        .commands
        .send(HostCommand::SetHeartbeatInterval(700))
        .await
        .expect("send");
    let cmd = read_host_msg(&mut s, &mut dec).await.expect("command");
    assert!(
        cmd.contains("SetHeartbeatInterval") && cmd.contains("700"),
        "{cmd}"
    );
    // ... and a reconnecting guest is told the new interval.
    drop(s);
    assert!(matches!(
        next(&mut t.link).await,
        GuestEvent::Disconnected { .. }
    ));
    let (_s, _dec, ack) = connect_and_ack(t.ep.listen_path()).await;
    assert!(ack.contains("heartbeat_interval_ms: 700"), "{ack}");
}

/// While the VM is paused the channel's hello and partial-frame clocks stop
/// (a parked guest cannot finish anything), and start afresh on resume.
#[tokio::test(start_paused = true)]
async fn a_paused_vm_does_not_time_out_its_guest() {
    let mut t = open(GuestLimits::default()).await;
    let limits = GuestLimits::default();
    // Connected, no hello yet; then the VM is paused for far longer than the
    // hello timeout.
    let _s = UnixStream::connect(t.ep.listen_path())
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(10)).await;
    t.link
        .commands
        .send(HostCommand::VmPaused(true))
        .await
        .expect("send");
    tokio::time::sleep(limits.hello_timeout * 5).await;
    assert!(
        t.link.events.try_recv().is_err(),
        "the connection was closed while the VM was paused"
    );
    // Resumed: the hello clock starts again, and runs out in full.
    t.link
        .commands
        .send(HostCommand::VmPaused(false))
        .await
        .expect("send");
    tokio::time::sleep(limits.hello_timeout / 2).await;
    assert!(t.link.events.try_recv().is_err(), "closed too early");
    expect_misbehaving(&mut t, "no Hello").await;
}

/// A guest reconnecting in a loop (each connection garbage) is served with a
/// growing backoff: about five connections in two seconds (100, 200, 400,
/// 800 ms apart) instead of one per round trip (hundreds without it).
#[tokio::test]
async fn a_guest_reconnecting_in_a_loop_is_quarantined() {
    let mut t = open(GuestLimits::default()).await;
    let path = t.ep.listen_path();
    let flood = tokio::spawn(async move {
        loop {
            if let Ok(mut s) = UnixStream::connect(&path).await {
                let _ = s.write_all(b"garbage!").await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let mut closed = 0;
    let end = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(ev)) = tokio::time::timeout_at(end, t.link.events.recv()).await {
        if let GuestEvent::Disconnected { misbehaving, .. } = ev {
            assert!(misbehaving);
            closed += 1;
        }
    }
    flood.abort();
    assert!(
        (2..=8).contains(&closed),
        "{closed} connections served in 2 s"
    );
}
