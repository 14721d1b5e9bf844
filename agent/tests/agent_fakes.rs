//! The agent on fake VMMs, disks and guests, on tokio's paused clock: goal
//! states, the lifecycle, health checks, restarts with backoff, the
//! crash-loop guard, removal, updates and re-adoption after an agent restart.

mod common;

use std::time::Duration;

use agent::fake::GuestBehaviour;
use agent::{AgentEvent, GoalError, InstanceState::*};
use common::*;
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

#[tokio::test(start_paused = true)]
async fn a_guest_with_the_shutdown_capability_is_asked_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let l = agent::fake::FakeLauncher::new();
    let d = agent::fake::FakeDisks::new();
    let g = agent::fake::FakeGuests::with_launcher(l.clone());
    let a = agent::Agent::open(config(dir.path()), backends(&l, &d, &g))
        .await
        .expect("open");
    let img = dir.path().join("img");
    std::fs::write(&img, b"x").expect("write");
    let info = a
        .image_cache()
        .import_file(&img, vmm_api::DiskFormat::Raw, None)
        .expect("import");
    let mut spec = agent::InstanceSpec {
        id: "a".into(),
        role: "r".into(),
        base_image: info.reference(),
        role_package: dir.path().to_owned(),
        vcpus: 1,
        memory_mib: 64,
        resource_disk_mib: 1,
        env: Default::default(),
        heartbeat_interval_ms: 500,
    };
    a.create_instance(spec.clone()).await.expect("create");
    a.wait_for("a", Duration::from_secs(60), |s| {
        s.is_some_and(|s| s.state == Ready)
    })
    .await
    .expect("ready");
    // An update: stop (through the guest), new disks, start.
    spec.vcpus = 2;
    a.update_instance(spec).await.expect("update");
    a.wait_for("a", Duration::from_secs(60), |s| {
        s.is_some_and(|s| s.state == Ready && s.spec.vcpus == 2)
    })
    .await
    .expect("ready again");
    assert!(matches!(
        g.commands("a").as_slice(),
        [agent::guest::HostCommand::Shutdown { .. }]
    ));
    let s = a.instance("a").expect("inst");
    assert!(
        s.last_exit
            .as_ref()
            .is_some_and(|e| e.detail.contains("PowerOff")),
        "{s:?}"
    );
    assert_eq!(d.prepared("a"), 2);
    let hist: Vec<_> = s.history.iter().map(|t| t.to).collect();
    assert!(
        hist.windows(4)
            .any(|w| w == [Stopping, Stopped, Pending, PreparingDisks]),
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
