//! The agent on fake VMMs, disks and guests, on tokio's paused clock: goal
//! states, the lifecycle, health checks, restarts with backoff, the
//! crash-loop guard, removal, updates and re-adoption after an agent restart.

use std::time::Duration;

use agent::backend::fake::GuestBehaviour;
use agent::{AgentEvent, GoalError, InstanceState::*};
use testkit::agent_harness::fakes::*;
use tokio::time::Instant;
use vmm_api::ExitReason;

#[tokio::test(start_paused = true)]
async fn goal_brings_instances_to_ready_idempotently() {
    let h = harness().await;
    let mut events = h.agent.subscribe();
    let out = h
        .agent
        .apply_goal(h.goal(1, &["web-1", "web-2"]))
        .await
        .expect("apply");
    assert_eq!(out.created, vec!["web-1", "web-2"]);
    for id in ["web-1", "web-2"] {
        let s = h.wait_state(id, Ready).await;
        assert_eq!(s.restarts, 0);
        assert!(s.last_heartbeat_unix_ms.is_some());
        assert_eq!(
            s.guest.as_ref().map(|g| g.agent_version.as_str()),
            Some("fake-guest 0")
        );
        assert_eq!(
            h.states(id),
            vec![
                (Pending, PreparingDisks),
                (PreparingDisks, Starting),
                (Starting, Booted),
                (Booted, Ready)
            ]
        );
        assert!(h
            .agent
            .instance(id)
            .expect("inst")
            .history
            .iter()
            .all(|t| !t.reason.is_empty()));
        assert_eq!(h.launcher.launches(id), 1);
        assert_eq!(h.disks.prepared(id), 1);
    }
    // The first event is the goal's.
    match events.recv().await.expect("event") {
        AgentEvent::GoalApplied {
            incarnation: 1,
            created,
            ..
        } => assert_eq!(created.len(), 2),
        e => panic!("unexpected {e:?}"),
    }
    // Same incarnation again: a no-op.
    let again = h
        .agent
        .apply_goal(h.goal(1, &["web-1", "web-2"]))
        .await
        .expect("again");
    assert!(again.unchanged);
    // Same incarnation, different content; an older one.
    let e = h
        .agent
        .apply_goal(h.goal(1, &["web-1"]))
        .await
        .expect_err("conflict");
    assert!(matches!(e, GoalError::Conflict(1)), "{e}");
    let e = h.agent.apply_goal(h.goal(0, &[])).await.expect_err("stale");
    assert!(e.to_string().contains("older"), "{e}");
    // Heartbeats keep it ready for a long time: no restart.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(h.agent.instance("web-1").expect("inst").state, Ready);
    assert_eq!(h.launcher.launches("web-1"), 1);
}

#[tokio::test(start_paused = true)]
async fn invalid_goals_are_refused_and_change_nothing() {
    let h = harness().await;
    let mut g = h.goal(1, &["a"]);
    g.instances[0].base_image = format!("sha256:{}", "00".repeat(32));
    let e = h
        .agent
        .apply_goal(g)
        .await
        .expect_err("unknown image")
        .to_string();
    assert!(e.contains("not in the image cache"), "{e}");
    let mut g = h.goal(1, &["a", "b"]);
    g.instances[1].memory_mib = 4000;
    let e = h
        .agent
        .apply_goal(g)
        .await
        .expect_err("too big")
        .to_string();
    assert!(e.contains("memory") && e.contains("4096"), "{e}");
    let mut g = h.goal(1, &["a"]);
    g.instances[0].id = "../etc".into();
    assert!(h.agent.apply_goal(g).await.is_err());
    let mut g = h.goal(1, &["a"]);
    g.instances[0].role_package = h.dir.path().join("nope");
    let e = h
        .agent
        .apply_goal(g)
        .await
        .expect_err("no role dir")
        .to_string();
    assert!(e.contains("not a directory"), "{e}");
    let pkg = h.dir.path().join("reserved");
    std::fs::create_dir(&pkg).expect("mkdir");
    std::fs::write(pkg.join("reddog-instance.json"), "{}").expect("write");
    let mut g = h.goal(1, &["a"]);
    g.instances[0].role_package = pkg;
    let e = h
        .agent
        .apply_goal(g)
        .await
        .expect_err("reserved name")
        .to_string();
    assert!(e.contains("reserved"), "{e}");
    assert!(h.agent.instances().is_empty());
    assert!(h.agent.goal().is_none());
    let n = std::fs::read_dir(h.agent.config().state_dir.join("instances"))
        .expect("ls")
        .count();
    assert_eq!(n, 0);
}

#[tokio::test(start_paused = true)]
async fn failed_disk_preparation_cleans_up_and_retries_on_a_new_goal() {
    let h = harness().await;
    h.disks.fail_for("a", "fake mkfs failure");
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    let s = h.wait_state("a", Failed).await;
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("fake mkfs failure")),
        "{s:?}"
    );
    let disks = h.agent.config().state_dir.join("instances/a/disks");
    assert!(!disks.exists(), "half-made disks left behind");
    assert_eq!(h.launcher.launches("a"), 0);
    // A new incarnation retries it.
    h.disks.heal("a");
    let mut g = h.goal(2, &["a"]);
    g.instances[0].memory_mib = 300;
    h.agent.apply_goal(g).await.expect("apply");
    h.wait_state("a", Ready).await;
    assert!(h.states("a").contains(&(Failed, Pending)));
}

#[tokio::test(start_paused = true)]
async fn missed_heartbeats_restart_the_instance() {
    let h = harness().await;
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    h.wait_state("a", Ready).await;
    let mut ev = h.agent.subscribe();
    let mut ev2 = h.agent.subscribe();
    let silent_at = Instant::now();
    h.guests.set("a", GuestBehaviour::HelloOnly);
    let t = wait_transition(&mut ev2, "a", Unhealthy).await;
    assert!(t.reason.contains("no heartbeat"), "{t:?}");
    // 3 intervals of 1 s + 1 s grace, give or take the last beat.
    let took = silent_at.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took <= Duration::from_secs(5),
        "{took:?}"
    );
    h.guests.set("a", GuestBehaviour::Healthy);
    h.wait_state("a", Ready).await;
    let s = h.agent.instance("a").expect("inst");
    assert_eq!(s.restarts, 1);
    assert_eq!(h.launcher.launches("a"), 2);
    assert_eq!(
        h.launcher.running_count(),
        1,
        "the unresponsive VMM was killed"
    );
    // The events told the same story.
    let mut seen = Vec::new();
    while let Ok(e) = ev.try_recv() {
        if let AgentEvent::Transition { transition, .. } = e {
            seen.push(transition.to);
        }
    }
    assert_eq!(seen, vec![Unhealthy, Restarting, Starting, Booted, Ready]);
}

#[tokio::test(start_paused = true)]
async fn a_guest_that_never_says_hello_hits_the_boot_timeout() {
    let h = harness().await;
    h.guests.set("a", GuestBehaviour::Silent);
    let t0 = Instant::now();
    let mut ev = h.agent.subscribe();
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    let t = wait_transition(&mut ev, "a", Unhealthy).await;
    assert!(t0.elapsed() >= Duration::from_secs(30));
    assert!(t.reason.contains("hello"), "{t:?}");
}

#[tokio::test(start_paused = true)]
async fn vmm_exits_restart_with_backoff_then_the_crash_loop_guard_trips() {
    let h = harness().await;
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    h.wait_state("a", Ready).await;
    let mut starts = Vec::new();
    for (i, reason) in [ExitReason::TripleFault, ExitReason::Reset]
        .into_iter()
        .enumerate()
    {
        let t = Instant::now();
        assert!(h.launcher.exit("a", reason));
        h.agent
            .wait_for("a", Duration::from_secs(600), |s| {
                s.is_some_and(|s| s.state == Ready && s.restarts == i as u32 + 1)
            })
            .await
            .expect("restarted");
        starts.push(t.elapsed());
    }
    // Backoff: 1 s after the first failure, 2 s after the second.
    assert!(
        starts[0] >= Duration::from_secs(1) && starts[0] < Duration::from_secs(2),
        "{starts:?}"
    );
    assert!(
        starts[1] >= Duration::from_secs(2) && starts[1] < Duration::from_secs(3),
        "{starts:?}"
    );
    let s = h.agent.instance("a").expect("inst");
    assert!(
        s.last_exit
            .as_ref()
            .is_some_and(|e| e.detail.contains("Reset")),
        "{s:?}"
    );
    // Third failure inside 5 minutes: failed, not restarted.
    assert!(h.launcher.exit("a", ExitReason::VcpuError));
    let s = h.wait_state("a", Failed).await;
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("crash loop")),
        "{s:?}"
    );
    assert_eq!(s.recent_failures, 3);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(h.launcher.launches("a"), 3);
    assert_eq!(h.agent.node_report().instances[0].state, Failed);
}

#[tokio::test(start_paused = true)]
async fn failures_outside_the_window_do_not_trip_the_guard() {
    let h = harness().await;
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    for round in 1..=4u32 {
        h.agent
            .wait_for("a", Duration::from_secs(600), |s| {
                s.is_some_and(|s| s.state == Ready && s.restarts == round - 1)
            })
            .await
            .expect("ready");
        // Three minutes apart: never three inside five minutes... except
        // pairs, which are fine.
        tokio::time::sleep(Duration::from_secs(180)).await;
        assert!(h.launcher.exit("a", ExitReason::TripleFault));
    }
    h.agent
        .wait_for("a", Duration::from_secs(600), |s| {
            s.is_some_and(|s| s.restarts == 4 && s.state == Ready)
        })
        .await
        .expect("still running");
}

#[tokio::test(start_paused = true)]
async fn launch_failures_count_towards_the_guard() {
    let h = harness().await;
    h.launcher.fail_launches(5);
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    let s = h.wait_state("a", Failed).await;
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("crash loop")),
        "{s:?}"
    );
    assert_eq!(h.launcher.launches("a"), 3);
}

#[tokio::test(start_paused = true)]
async fn removal_stops_and_deletes() {
    let h = harness().await;
    h.agent
        .apply_goal(h.goal(1, &["a", "b"]))
        .await
        .expect("apply");
    h.wait_state("a", Ready).await;
    h.wait_state("b", Ready).await;
    let mut ev = h.agent.subscribe();
    let out = h.agent.apply_goal(h.goal(2, &["b"])).await.expect("apply");
    assert_eq!(out.removed, vec!["a"]);
    h.wait_gone("a").await;
    assert!(h.launcher.running("a").is_none());
    assert!(h.launcher.running("b").is_some());
    assert!(!h.agent.config().state_dir.join("instances/a").exists());
    let mut tos = Vec::new();
    let mut removed = false;
    while let Ok(e) = ev.try_recv() {
        match e {
            AgentEvent::Transition {
                instance,
                transition,
            } if instance == "a" => tos.push(transition.to),
            AgentEvent::InstanceRemoved { instance } => removed = instance == "a",
            _ => {}
        }
    }
    assert_eq!(tos, vec![Stopping, Stopped]);
    assert!(removed);
    // Delete through the per-instance call; then re-create.
    h.agent.delete_instance("b").await.expect("delete");
    h.wait_gone("b").await;
    assert_eq!(h.agent.goal().expect("goal").incarnation, 3);
    h.agent.create_instance(h.spec("b")).await.expect("create");
    h.wait_state("b", Ready).await;
    assert!(h.agent.create_instance(h.spec("b")).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_vmm_that_ignores_the_graceful_stop_is_killed() {
    let h = harness().await;
    h.launcher.ignore_graceful(true);
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    h.wait_state("a", Ready).await;
    let t = Instant::now();
    h.agent.apply_goal(h.goal(2, &[])).await.expect("apply");
    h.wait_gone("a").await;
    // stop_grace is 4 s in the harness.
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(h.launcher.running_count(), 0);
}

/// An agent whose fake guests are linked to their fake VMs (they obey
/// `Shutdown`, fall silent while paused, take `SetHeartbeatInterval`), with
/// one instance "a" ready.
async fn linked() -> (
    tempfile::TempDir,
    agent::Agent,
    agent::backend::fake::FakeLauncher,
    agent::InstanceSpec,
    agent::backend::fake::FakeDisks,
    agent::backend::fake::FakeGuests,
) {
    let dir = tempfile::Builder::new()
        .prefix("rdg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let l = agent::backend::fake::FakeLauncher::new();
    let d = agent::backend::fake::FakeDisks::new();
    let g = agent::backend::fake::FakeGuests::with_launcher(l.clone());
    let a = agent::Agent::open(config(dir.path()), backends(&l, &d, &g))
        .await
        .expect("open");
    let img = dir.path().join("img");
    std::fs::write(&img, b"x").expect("write");
    let info = a
        .image_cache()
        .import_file(&img, vmm_api::DiskFormat::Raw, None)
        .expect("import");
    let spec = agent::InstanceSpec {
        id: "a".into(),
        role: "r".into(),
        base_image: info.reference(),
        role_package: dir.path().to_owned(),
        vcpus: 1,
        memory_mib: 64,
        resource_disk_mib: 1,
        env: Default::default(),
        heartbeat_interval_ms: 500,
        disk_rate_limit: None,
    };
    a.create_instance(spec.clone()).await.expect("create");
    a.wait_for("a", Duration::from_secs(60), |s| {
        s.is_some_and(|s| s.state == Ready)
    })
    .await
    .expect("ready");
    (dir, a, l, spec, d, g)
}

#[tokio::test(start_paused = true)]
async fn a_guest_with_the_shutdown_capability_is_asked_first() {
    let (_dir, a, _l, mut spec, d, g) = linked().await;
    // An update: stop (through the guest), start again (a vCPU change keeps
    // every disk).
    spec.vcpus = 2;
    a.update_instance(spec).await.expect("update");
    a.wait_for("a", Duration::from_secs(60), |s| {
        s.is_some_and(|s| s.state == Ready && s.spec.vcpus == 2)
    })
    .await
    .expect("ready again");
    assert!(matches!(
        g.commands("a").as_slice(),
        [agent::backend::guest::HostCommand::Shutdown { .. }]
    ));
    let s = a.instance("a").expect("inst");
    assert!(
        s.last_exit
            .as_ref()
            .is_some_and(|e| e.detail.contains("PowerOff")),
        "{s:?}"
    );
    assert_eq!(d.prepared("a"), 1);
    let hist: Vec<_> = s.history.iter().map(|t| t.to).collect();
    assert!(
        hist.windows(4)
            .any(|w| w == [Stopping, Stopped, Pending, Starting]),
        "{hist:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_readopts_running_vmms_and_restarts_dead_ones() {
    let h = harness().await;
    h.agent
        .apply_goal(h.goal(1, &["live", "dead"]))
        .await
        .expect("apply");
    h.wait_state("live", Ready).await;
    h.wait_state("dead", Ready).await;
    let pid = h.launcher.running("live").expect("pid");
    h.agent.shutdown();
    tokio::task::yield_now().await;
    // While the agent is away, one VMM dies.
    assert!(h.launcher.exit("dead", ExitReason::TripleFault));
    let agent2 = agent::Agent::open(
        config(h.dir.path()),
        backends(&h.launcher, &h.disks, &h.guests),
    )
    .await
    .expect("reopen");
    assert_eq!(agent2.goal().expect("goal").incarnation, 1);
    let live = agent2
        .wait_for("live", Duration::from_secs(60), |s| {
            s.is_some_and(|s| s.state == Ready)
        })
        .await
        .expect("live ready");
    assert_eq!(live.vmm_pid, Some(pid));
    assert_eq!(h.launcher.launches("live"), 1, "re-adopted, not rebooted");
    assert!(
        live.history
            .iter()
            .any(|t| t.to == Booted && t.reason.contains("re-adopted")),
        "{live:?}"
    );
    let dead = agent2
        .wait_for("dead", Duration::from_secs(60), |s| {
            s.is_some_and(|s| s.state == Ready)
        })
        .await
        .expect("dead restarted");
    assert_eq!(h.launcher.launches("dead"), 2);
    assert_eq!(h.disks.prepared("dead"), 1, "kept its disks");
    assert!(
        dead.history
            .iter()
            .any(|t| t.from == Pending && t.to == Starting),
        "{dead:?}"
    );
    // The old history survived the restart.
    assert!(dead.history.iter().any(|t| t.to == PreparingDisks));
}

#[tokio::test(start_paused = true)]
async fn a_reused_pid_is_not_adopted() {
    let h = harness().await;
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    h.wait_state("a", Ready).await;
    h.agent.shutdown();
    tokio::task::yield_now().await;
    // Tamper with the record: same pid, another start time.
    let rec_path = h.agent.config().state_dir.join("instances/a/record.json");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec_path).expect("read")).expect("json");
    let st = rec["vmm"]["start_time"].as_u64().expect("start time");
    rec["vmm"]["start_time"] = (st + 1).into();
    std::fs::write(&rec_path, serde_json::to_vec(&rec).expect("json")).expect("write");
    let agent2 = agent::Agent::open(
        config(h.dir.path()),
        backends(&h.launcher, &h.disks, &h.guests),
    )
    .await
    .expect("reopen");
    agent2
        .wait_for("a", Duration::from_secs(60), |s| {
            s.is_some_and(|s| s.state == Ready)
        })
        .await
        .expect("ready");
    assert_eq!(
        h.launcher.launches("a"),
        2,
        "started anew instead of adopting"
    );
}

#[tokio::test(start_paused = true)]
async fn node_report_metrics_and_image_references() {
    let h = harness().await;
    h.agent
        .apply_goal(h.goal(7, &["a", "b"]))
        .await
        .expect("apply");
    h.wait_state("a", Ready).await;
    h.wait_state("b", Ready).await;
    let r = h.agent.node_report();
    assert_eq!(r.node_id, "node-1");
    assert_eq!(r.goal_incarnation, Some(7));
    assert_eq!(
        (r.used.vcpus, r.used.memory_mib, r.used.disk_mib),
        (2, 512, 200)
    );
    assert_eq!(r.capacity.vcpus, 8);
    assert_eq!(r.instances.len(), 2);
    assert!(r
        .instances
        .iter()
        .all(|i| i.state == Ready && i.last_heartbeat_unix_ms.is_some()));
    let m = h.agent.metrics();
    assert!(m.contains("reddog_instances{state=\"ready\"} 2"), "{m}");
    assert!(m.contains("reddog_used_vcpus{node=\"node-1\"} 2"), "{m}");
    // Image references: in use, kept by gc; unused, collected.
    let other = h.dir.path().join("other.raw");
    std::fs::write(&other, b"unused").expect("write");
    h.agent
        .image_cache()
        .import_file(&other, vmm_api::DiskFormat::Raw, None)
        .expect("import");
    let imgs = h.agent.images();
    assert_eq!(imgs.len(), 2);
    assert_eq!(imgs.iter().map(|i| i.references).sum::<usize>(), 2);
    let gone = h.agent.collect_images();
    assert_eq!(gone.len(), 1);
    assert_eq!(h.agent.images()[0].reference(), h.image);
    // Once the instances are gone, the base goes too.
    h.agent.apply_goal(h.goal(8, &[])).await.expect("apply");
    h.wait_gone("a").await;
    h.wait_gone("b").await;
    assert_eq!(h.agent.collect_images().len(), 1);
    assert!(h.agent.images().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_paused_instance_is_not_restarted_and_resumes_where_it_was() {
    use agent::InstanceOpError;
    let (_dir, a, l, _spec, _d, _g) = linked().await;
    let pid = l.running("a").expect("pid");
    // Resuming a running instance, or anything on an unknown one, is refused.
    let e = a.resume_instance("a").await.expect_err("not paused");
    assert!(
        matches!(e, InstanceOpError::WrongState { state: Ready, .. }),
        "{e}"
    );
    let e = a.pause_instance("nope").await.expect_err("unknown");
    assert!(matches!(e, InstanceOpError::NoSuchInstance(_)), "{e}");

    let s = a.pause_instance("a").await.expect("pause");
    assert_eq!(s.state, Paused);
    assert!(l.is_paused("a"));
    let e = a.pause_instance("a").await.expect_err("paused already");
    assert!(
        matches!(e, InstanceOpError::WrongState { state: Paused, .. }),
        "{e}"
    );
    // The guest sends nothing while paused; far beyond the heartbeat
    // timeout (3 x 500 ms + 1 s) nothing is restarted.
    let beats = a.instance("a").expect("inst").heartbeat_seq;
    tokio::time::sleep(Duration::from_secs(600)).await;
    let s = a.instance("a").expect("inst");
    assert_eq!(s.state, Paused);
    assert_eq!(s.heartbeat_seq, beats, "a paused guest sent heartbeats");
    assert_eq!(l.launches("a"), 1);
    assert_eq!(s.vmm_pid, Some(pid));

    let s = a.resume_instance("a").await.expect("resume");
    assert_eq!(s.state, Ready, "back to the state it was paused in");
    assert!(!l.is_paused("a"));
    // Heartbeats flow again and keep it ready.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let s = a.instance("a").expect("inst");
    assert_eq!(s.state, Ready);
    assert!(s.heartbeat_seq > beats);
    assert_eq!(l.launches("a"), 1);
    let reasons: Vec<_> = s
        .history
        .iter()
        .filter(|t| t.from == Paused || t.to == Paused)
        .map(|t| (t.from, t.to, t.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (Ready, Paused, "paused through the agent".to_string()),
            (Paused, Ready, "resumed through the agent".to_string()),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn vmm_events_pause_and_boot_timer_are_followed() {
    let (_dir, a, l, _spec, _d, _g) = linked().await;
    let mut events = a.subscribe();
    // Someone with the VMM's control socket pauses it: the agent follows.
    assert!(l.set_paused("a", true));
    a.wait_for("a", Duration::from_secs(5), |s| {
        s.is_some_and(|s| s.state == Paused)
    })
    .await
    .expect("paused");
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(l.launches("a"), 1, "not restarted while paused");
    assert!(l.set_paused("a", false));
    a.wait_for("a", Duration::from_secs(5), |s| {
        s.is_some_and(|s| s.state == Ready)
    })
    .await
    .expect("resumed");
    let s = a.instance("a").expect("inst");
    assert!(s
        .history
        .iter()
        .any(|t| t.to == Paused && t.reason.contains("VMM reports")));
    // The boot timer is recorded and announced.
    assert!(l.boot_timer("a", 4321));
    a.wait_for("a", Duration::from_secs(5), |s| {
        s.is_some_and(|s| s.boot_time_us == Some(4321))
    })
    .await
    .expect("boot time");
    let mut booted = false;
    while let Ok(e) = events.try_recv() {
        booted |= matches!(
            e,
            AgentEvent::GuestBooted {
                boot_time_us: 4321,
                ..
            }
        );
    }
    assert!(booted, "no GuestBooted event");
}

#[tokio::test(start_paused = true)]
async fn a_paused_vmm_is_readopted_paused_and_a_removal_resumes_it_to_stop_it() {
    let (dir, a, l, _spec, _d, _g) = linked().await;
    let pid = l.running("a").expect("pid");
    a.pause_instance("a").await.expect("pause");
    a.shutdown();
    tokio::task::yield_now().await;
    let d = agent::backend::fake::FakeDisks::new();
    let g = agent::backend::fake::FakeGuests::with_launcher(l.clone());
    let a2 = agent::Agent::open(config(dir.path()), backends(&l, &d, &g))
        .await
        .expect("reopen");
    let s = a2
        .wait_for("a", Duration::from_secs(5), |s| {
            s.is_some_and(|s| s.state == Paused)
        })
        .await
        .expect("re-adopted paused");
    assert_eq!(s.vmm_pid, Some(pid));
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        l.launches("a"),
        1,
        "a paused VMM is re-adopted, not restarted"
    );
    // Removal resumes it so the guest can shut down gracefully (a paused
    // fake guest ignores Shutdown).
    let mut events = a2.subscribe();
    a2.delete_instance("a").await.expect("delete");
    a2.wait_for("a", Duration::from_secs(60), |s| s.is_none())
        .await;
    assert!(a2.instance("a").is_none());
    assert_eq!(l.running_count(), 0);
    assert!(matches!(
        g.commands("a").as_slice(),
        [agent::backend::guest::HostCommand::Shutdown { .. }]
    ));
    let mut exit = None;
    while let Ok(e) = events.try_recv() {
        if let AgentEvent::VmmExited { exit: x, .. } = e {
            exit = Some(x);
        }
    }
    let exit = exit.expect("a VmmExited event");
    assert!(exit.detail.contains("PowerOff"), "{exit:?}");
}

/// The instance's disk files: inode and contents.
fn disk_files(h: &FakeAgent, id: &str) -> std::collections::BTreeMap<String, (u64, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let dir = h
        .agent
        .config()
        .state_dir
        .join("instances")
        .join(id)
        .join("disks");
    std::fs::read_dir(&dir)
        .expect("ls disks")
        .map(|e| {
            let p = e.expect("entry").path();
            let ino = std::fs::metadata(&p).expect("stat").ino();
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, (ino, std::fs::read(&p).expect("read")))
        })
        .collect()
}

/// Applies `spec` as incarnation `inc` and waits until it runs ready.
async fn update_to(h: &FakeAgent, inc: u64, spec: agent::InstanceSpec) -> agent::InstanceStatus {
    let id = spec.id.clone();
    h.agent
        .apply_goal(agent::GoalState {
            incarnation: inc,
            instances: vec![spec.clone()],
        })
        .await
        .expect("apply");
    h.agent
        .wait_for(&id, Duration::from_secs(600), |s| {
            s.is_some_and(|s| s.state == Ready && s.spec == spec)
        })
        .await
        .expect("ready with the new spec")
}

fn role_env(
    files: &std::collections::BTreeMap<String, (u64, Vec<u8>)>,
) -> agent::backend::disks::InstanceFile {
    serde_json::from_slice(&files["role.raw"].1)
        .expect("the fake role disk holds the instance file")
}

#[tokio::test(start_paused = true)]
async fn a_new_base_image_keeps_the_resource_disk() {
    use agent::backend::disks::DiskSet;
    let h = harness().await;
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    h.wait_state("a", Ready).await;
    let before = disk_files(&h, "a");
    // The guest leaves scratch data on its resource disk.
    let res = h
        .agent
        .config()
        .state_dir
        .join("instances/a/disks/resource.raw");
    std::fs::write(&res, b"scratch data").expect("write");
    let img2 = h.dir.path().join("base2.raw");
    std::fs::write(&img2, b"another base image").expect("write");
    let info2 = h
        .agent
        .image_cache()
        .import_file(&img2, vmm_api::DiskFormat::Raw, None)
        .expect("import");
    let mut spec = h.spec("a");
    spec.base_image = info2.reference();
    let s = update_to(&h, 2, spec).await;

    assert_eq!(
        h.disks.made("a"),
        vec![
            DiskSet::ALL,
            DiskSet {
                os: true,
                ..DiskSet::NONE
            }
        ]
    );
    let after = disk_files(&h, "a");
    assert_eq!(
        after["resource.raw"].0, before["resource.raw"].0,
        "same file"
    );
    assert_eq!(after["resource.raw"].1, b"scratch data", "data kept");
    assert_eq!(after["role.raw"], before["role.raw"]);
    let os = String::from_utf8_lossy(&after["os.qcow2"].1).into_owned();
    assert!(os.contains(&info2.sha256), "over the new base: {os}");
    assert_eq!(h.launcher.launches("a"), 2);
    assert!(
        s.history.iter().any(|t| t.to == PreparingDisks
            && t.reason.contains("the OS disk")
            && t.reason.contains("keeping the resource and role disks")),
        "{:#?}",
        s.history
    );
}

#[tokio::test(start_paused = true)]
async fn a_vcpu_or_memory_change_remakes_no_disk() {
    use agent::backend::disks::DiskSet;
    let h = harness().await;
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    h.wait_state("a", Ready).await;
    let before = disk_files(&h, "a");
    let mut spec = h.spec("a");
    spec.vcpus = 2;
    spec.memory_mib = 512;
    spec.heartbeat_interval_ms = 2000;
    let s = update_to(&h, 2, spec).await;
    assert_eq!(h.disks.made("a"), vec![DiskSet::ALL]);
    assert_eq!(disk_files(&h, "a"), before);
    assert_eq!(h.launcher.launches("a"), 2, "the VMM restarted");
    let to: Vec<_> = s.history.iter().map(|t| t.to).collect();
    assert_eq!(
        to.iter().filter(|t| **t == PreparingDisks).count(),
        1,
        "{to:?}"
    );
    assert!(
        to.windows(4)
            .any(|w| w == [Stopping, Stopped, Pending, Starting]),
        "{to:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_environment_change_remakes_only_the_role_disk() {
    use agent::backend::disks::DiskSet;
    let h = harness().await;
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    h.wait_state("a", Ready).await;
    let before = disk_files(&h, "a");
    assert_eq!(role_env(&before).env["MODE"], "test");
    assert_eq!(role_env(&before).instance_id, "a");
    let mut spec = h.spec("a");
    spec.env.insert("MODE".into(), "prod".into());
    update_to(&h, 2, spec).await;
    let role_only = DiskSet {
        role: true,
        ..DiskSet::NONE
    };
    assert_eq!(h.disks.made("a"), vec![DiskSet::ALL, role_only]);
    let after = disk_files(&h, "a");
    assert_eq!(after["os.qcow2"], before["os.qcow2"]);
    assert_eq!(after["resource.raw"], before["resource.raw"]);
    assert_eq!(role_env(&after).env["MODE"], "prod");

    // A remake that fails: Failed, the half-made role disk removed, the kept
    // disks left for the retry, which remakes only the role disk again.
    h.disks.fail_for("a", "fake mkfs failure");
    let mut spec = h.spec("a");
    spec.role = "worker".into();
    h.agent
        .apply_goal(agent::GoalState {
            incarnation: 3,
            instances: vec![spec.clone()],
        })
        .await
        .expect("apply");
    let s = h.wait_state("a", Failed).await;
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("fake mkfs failure")),
        "{s:?}"
    );
    let failed = disk_files(&h, "a");
    assert_eq!(
        failed.keys().collect::<Vec<_>>(),
        vec!["os.qcow2", "resource.raw"],
        "the half-made role disk is gone"
    );
    assert_eq!(failed["resource.raw"], before["resource.raw"]);
    h.disks.heal("a");
    update_to(&h, 4, spec).await;
    assert_eq!(h.disks.made("a"), vec![DiskSet::ALL, role_only, role_only]);
    let retried = disk_files(&h, "a");
    assert_eq!(retried["resource.raw"], before["resource.raw"]);
    assert_eq!(retried["os.qcow2"], before["os.qcow2"]);
    assert_eq!(role_env(&retried).role, "worker");
    assert_eq!(h.disks.prepared("a"), 1);
}

/// An agent killed while an update remakes a disk: the new agent remakes the
/// same disk and still keeps the others (the resource disk's data survives).
#[tokio::test(start_paused = true)]
async fn an_update_interrupted_by_an_agent_restart_still_keeps_the_resource_disk() {
    use agent::backend::disks::DiskSet;
    let h = harness().await;
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    h.wait_state("a", Ready).await;
    let res = h
        .agent
        .config()
        .state_dir
        .join("instances/a/disks/resource.raw");
    std::fs::write(&res, b"scratch data").expect("write");
    let before = disk_files(&h, "a");
    // A slow remake of the role disk (new environment) ...
    h.disks.set_delay(Duration::from_secs(30));
    let mut spec = h.spec("a");
    spec.env.insert("COLOR".into(), "blue".into());
    h.agent
        .apply_goal(agent::GoalState {
            incarnation: 2,
            instances: vec![spec.clone()],
        })
        .await
        .expect("apply");
    h.wait_state("a", PreparingDisks).await;
    // ... during which the agent dies.
    h.agent.shutdown();
    tokio::task::yield_now().await;
    h.disks.set_delay(Duration::ZERO);
    let agent2 = agent::Agent::open(
        config(h.dir.path()),
        backends(&h.launcher, &h.disks, &h.guests),
    )
    .await
    .expect("reopen");
    let s = agent2
        .wait_for("a", Duration::from_secs(600), |s| {
            s.is_some_and(|s| s.state == Ready && s.spec == spec)
        })
        .await
        .expect("ready with the new spec after the restart");
    let after = disk_files(&h, "a");
    assert_eq!(
        after["resource.raw"].0, before["resource.raw"].0,
        "same file"
    );
    assert_eq!(after["resource.raw"].1, b"scratch data", "data kept");
    assert_eq!(after["os.qcow2"], before["os.qcow2"]);
    assert_eq!(
        role_env(&after).env.get("COLOR").map(String::as_str),
        Some("blue")
    );
    // Every remake was of the role disk only (the first one was cut short).
    let made = h.disks.made("a");
    assert_eq!(made[0], DiskSet::ALL);
    assert!(
        made[1..].iter().all(|m| *m
            == DiskSet {
                role: true,
                ..DiskSet::NONE
            }),
        "{made:?}"
    );
    assert!(
        s.history
            .iter()
            .any(|t| t.to == PreparingDisks && t.reason.contains("keeping")),
        "{:#?}",
        s.history
    );
}

/// A change of the heartbeat interval alone is applied live to a guest that
/// takes `SetHeartbeatInterval`: no restart, no disk remade.
#[tokio::test(start_paused = true)]
async fn an_interval_only_change_is_applied_live() {
    let (_dir, a, l, mut spec, _d, _g) = linked().await;
    let pid = l.running("a").expect("pid");
    spec.heartbeat_interval_ms = 2000;
    a.update_instance(spec.clone()).await.expect("update");
    // (A live change makes no transition, so no event to wait for.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = a.instance("a").expect("inst");
    assert_eq!(s.spec.heartbeat_interval_ms, 2000);
    assert_eq!(s.state, Ready);
    // Longer than the old timeout (3 x 500 ms + 1 s), shorter than the new
    // one: the guest beats every 2 s now and stays ready.
    let seq = s.heartbeat_seq;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let s = a.instance("a").expect("inst");
    assert_eq!(s.state, Ready);
    assert_eq!(
        (s.vmm_pid, l.launches("a")),
        (Some(pid), 1),
        "not restarted"
    );
    let beats = s.heartbeat_seq.unwrap_or(0) - seq.unwrap_or(0);
    assert!(
        (25..=35).contains(&beats),
        "{beats} heartbeats in 60 s at 2 s"
    );
    // A change of more than the interval still restarts the VMM.
    spec.heartbeat_interval_ms = 500;
    spec.memory_mib = 128;
    a.update_instance(spec.clone()).await.expect("update");
    a.wait_for("a", Duration::from_secs(60), |s| {
        s.is_some_and(|s| s.state == Ready && s.spec == spec)
    })
    .await
    .expect("ready with the new spec");
    assert_eq!(l.launches("a"), 2);
}

/// An agent killed between spawning a VMM and recording it: the restarted
/// agent finds that VMM (`VmmLauncher::recover`) and adopts it instead of
/// running a second one over the same disks.
#[tokio::test(start_paused = true)]
async fn a_vmm_spawned_but_not_recorded_is_recovered_not_doubled() {
    let h = harness().await;
    h.launcher.set_launch_delay(Duration::from_secs(30));
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    h.wait_state("a", Starting).await;
    // The fake VM exists; the launcher has not returned (no record yet).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = h.launcher.running("a").expect("spawned");
    assert_eq!(h.agent.instance("a").expect("inst").vmm_pid, None);
    h.agent.shutdown();
    tokio::task::yield_now().await;
    h.launcher.set_launch_delay(Duration::ZERO);
    let agent2 = agent::Agent::open(
        config(h.dir.path()),
        backends(&h.launcher, &h.disks, &h.guests),
    )
    .await
    .expect("reopen");
    let s = agent2
        .wait_for("a", Duration::from_secs(60), |s| {
            s.is_some_and(|s| s.state == Ready)
        })
        .await
        .expect("ready");
    assert_eq!(s.vmm_pid, Some(pid), "the unrecorded VMM was adopted");
    assert_eq!(h.launcher.launches("a"), 1, "no second VMM");
    assert_eq!(h.launcher.running_count(), 1);
}

/// What the guest or the VMM says while the instance is paused moves the
/// state it resumes to (a boot timer queued before the pause is not lost).
#[tokio::test(start_paused = true)]
async fn a_boot_seen_while_paused_is_where_the_instance_resumes() {
    let h = harness().await;
    h.guests.set_default(GuestBehaviour::Silent);
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    h.wait_state("a", Starting).await;
    let s = h.agent.pause_instance("a").await.expect("pause");
    assert_eq!(s.state, Paused);
    assert!(h.launcher.boot_timer("a", 999));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.agent.instance("a").expect("inst").state, Paused);
    let s = h.agent.resume_instance("a").await.expect("resume");
    assert_eq!(s.state, Booted, "{:#?}", s.history);
    assert_eq!(s.boot_time_us, Some(999));
}

#[tokio::test(start_paused = true)]
async fn a_new_boot_id_from_the_same_vmm_is_counted_as_misbehaviour() {
    let h = harness().await;
    h.agent
        .apply_goal(h.goal(1, &["web-1"]))
        .await
        .expect("apply");
    let s = h.wait_state("web-1", Ready).await;
    assert_eq!(s.guest_misbehaviours, 0);
    let pid = s.vmm_pid;
    let mut events = h.agent.subscribe();
    h.guests.impostor_hello("web-1");
    let reason = loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Ok(AgentEvent::GuestMisbehaved { instance, reason })) => {
                assert_eq!(instance, "web-1");
                break reason;
            }
            Ok(Ok(_)) => {}
            other => panic!("no misbehaviour reported: {other:?}"),
        }
    };
    assert!(reason.contains("new boot id"), "{reason}");
    let s = h.agent.instance("web-1").expect("instance");
    assert_eq!(s.guest_misbehaviours, 1);
    assert_eq!(s.vmm_pid, pid, "the VMM is not restarted for it");
    let report = h.agent.node_report();
    assert_eq!(report.instances[0].guest_misbehaviours, 1);
    assert!(h
        .agent
        .metrics()
        .contains("reddog_instance_guest_misbehaviours_total{instance=\"web-1\",role=\"web\"} 1"));
}

/// Removing an instance whose VMM a restarted agent re-adopted: the guest
/// reconnects and is asked to shut down itself, so the removal takes as long
/// as the guest needs, not the graceful-stop wait (here the VMM ignores the
/// ACPI button, so without the guest's own shutdown it would wait half the
/// stop grace and then be killed).
#[tokio::test(start_paused = true)]
async fn removing_a_re_adopted_vmm_lets_its_guest_shut_down_at_once() {
    let (dir, a, l, _spec, d, g) = linked().await;
    l.ignore_graceful(true);
    let pid = l.running("a").expect("running");
    let incarnation = a.goal().expect("goal").incarnation;
    a.shutdown();
    tokio::task::yield_now().await;
    // The goal changed while no agent ran: "a" is no longer wanted.
    std::fs::write(
        dir.path().join("state").join("goal.json"),
        serde_json::json!({ "incarnation": incarnation + 1, "instances": [] }).to_string(),
    )
    .expect("goal");
    let t = tokio::time::Instant::now();
    let a2 = agent::Agent::open(config(dir.path()), backends(&l, &d, &g))
        .await
        .expect("reopen");
    let mut events = a2.subscribe();
    let exit = loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Ok(AgentEvent::VmmExited { instance, exit })) if instance == "a" => break exit,
            Ok(Ok(_)) => {}
            other => panic!("the re-adopted VMM did not stop: {other:?}"),
        }
    };
    let took = t.elapsed();
    assert_eq!(
        exit.report.as_ref().map(|r| r.reason),
        Some(vmm_api::ExitReason::PowerOff),
        "not the guest's own shutdown: {exit:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "removal took {took:?} (the stop grace is {:?})",
        config(dir.path()).health.stop_grace
    );
    assert!(g
        .commands("a")
        .iter()
        .any(|c| matches!(c, agent::backend::guest::HostCommand::Shutdown { .. })));
    assert_eq!(l.running("a"), None, "VMM {pid} still runs");
    a2.wait_for("a", Duration::from_secs(30), |s| s.is_none())
        .await;
    assert!(a2.instance("a").is_none(), "not removed");
}

/// The node's disk counts each instance's OS overlay at its base image's
/// virtual size, not only the resource disk: a qcow2 base of 600 MiB virtual
/// (a few KiB of file) makes two instances with 100 MiB resource disks need
/// 1400 MiB. Without the overlay count the goal (200 MiB of resource disks)
/// would fit the 1000 MiB node.
#[tokio::test]
async fn os_overlays_count_against_the_node_disk() {
    let h = harness_with(|c| c.node.capacity.disk_mib = 1000).await;
    let base = h.dir.path().join("base.qcow2");
    vhd::create(
        &base,
        vhd::Format::Qcow2,
        &vhd::CreateOptions::new(600 << 20),
    )
    .expect("qcow2");
    let info = h
        .agent
        .image_cache()
        .import_file(&base, vmm_api::DiskFormat::Qcow2, None)
        .expect("import");
    assert!(info.size < 1 << 20, "the file is small: {}", info.size);
    let spec = |id: &str| agent::InstanceSpec {
        base_image: info.reference(),
        ..h.spec(id)
    };
    let two = agent::GoalState {
        incarnation: 1,
        instances: vec![spec("a"), spec("b")],
    };
    let e = h
        .agent
        .apply_goal(two)
        .await
        .expect_err("over the node's disk");
    let msg = e.to_string();
    assert!(msg.contains("OS overlays") && msg.contains("1400"), "{msg}");
    let one = agent::GoalState {
        incarnation: 2,
        instances: vec![spec("a")],
    };
    h.agent.apply_goal(one).await.expect("700 MiB fits");
}
