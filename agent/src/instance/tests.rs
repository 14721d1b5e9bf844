//! The instance task on its own: an [`InstanceEnv`] over the fake backends,
//! driven through its [`InstanceHandle`] only (no `Agent`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};

use super::*;
use crate::backend::fake::{FakeDisks, FakeGuests, FakeLauncher};
use crate::backend::Backends;
use crate::images::ImageCache;

struct Rig {
    env: Arc<InstanceEnv>,
    ended: mpsc::UnboundedReceiver<String>,
    launcher: FakeLauncher,
    spec: InstanceSpec,
    _dir: tempfile::TempDir,
}

fn rig(health: impl FnOnce(&mut HealthPolicy)) -> Rig {
    let dir = tempfile::Builder::new()
        .prefix("rdg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let state = dir.path().join("state");
    for sub in ["instances", "run", "images"] {
        std::fs::create_dir_all(state.join(sub)).expect("state dir");
    }
    let images = ImageCache::open(state.join("images")).expect("cache");
    let img = dir.path().join("base.raw");
    std::fs::write(&img, b"base").expect("image");
    let info = images
        .import_file(&img, vmm_api::DiskFormat::Raw, None)
        .expect("import");
    let role = dir.path().join("role");
    std::fs::create_dir(&role).expect("role");
    let launcher = FakeLauncher::new();
    let mut policy = HealthPolicy {
        boot_timeout: Duration::from_secs(30),
        stop_grace: Duration::from_secs(4),
        ..HealthPolicy::default()
    };
    health(&mut policy);
    let (ended_tx, ended) = mpsc::unbounded_channel();
    let (events, _) = broadcast::channel(256);
    let env = Arc::new(InstanceEnv {
        state_dir: state,
        guest_port: 1024,
        health: policy,
        backends: Backends {
            launcher: Arc::new(launcher.clone()),
            disks: Arc::new(FakeDisks::new()),
            guests: Arc::new(FakeGuests::new()),
            net: Arc::new(crate::backend::fake::FakeNet::new()),
        },
        images,
        events,
        ended: ended_tx,
        role_roots: crate::paths::Roots::role(vec![dir.path().to_owned()]),
        net: None,
        default_disk_rate_limit: None,
    });
    let spec = InstanceSpec {
        id: "one".into(),
        role: "web".into(),
        base_image: info.reference(),
        role_package: role,
        vcpus: 1,
        memory_mib: 128,
        resource_disk_mib: 16,
        env: Default::default(),
        heartbeat_interval_ms: 1000,
        disk_rate_limit: None,
    };
    Rig {
        env,
        ended,
        launcher,
        spec,
        _dir: dir,
    }
}

async fn wait_state(h: &InstanceHandle, want: InstanceState) -> InstanceStatus {
    for _ in 0..100_000 {
        if let Some(s) = h.status(false) {
            if s.state == want {
                return s;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never reached {want}: {:?}", h.status(true));
}

#[tokio::test(start_paused = true)]
async fn a_task_runs_to_ready_and_hands_its_end_back_when_removed() {
    let mut r = rig(|_| {});
    let h = InstanceHandle::spawn(
        r.env.clone(),
        r.spec.clone(),
        Vec::new(),
        Desired::Run(r.spec.clone()),
        StartMode::New,
    );
    let s = wait_state(&h, InstanceState::Ready).await;
    assert!(s.vmm_pid.is_some());
    assert_eq!(r.launcher.launches("one"), 1);
    let dir = r.env.instance_dir("one");
    assert!(record::record_path(&dir).is_file());

    h.set_desired(Desired::Removed).expect("live task");
    let id = tokio::time::timeout(Duration::from_secs(60), r.ended.recv())
        .await
        .expect("the task ends")
        .expect("an id");
    assert_eq!(id, "one");
    assert!(h.is_ended());
    assert!(h.status(false).is_none(), "an ended task shows no instance");
    assert!(!dir.exists(), "its directory is removed");
    assert_eq!(r.launcher.running("one"), None, "its VMM is stopped");
    // A goal that wants the id again gets a new task, not this one.
    assert_eq!(h.set_desired(Desired::Run(r.spec.clone())), Err(Ended));
    assert_eq!(h.poke(), Err(Ended));
}

/// Each disk of the VM gets the spec's rate limit, or the node's default when
/// the spec sets none (without the plumbing the VMM's disks are unlimited).
#[tokio::test(start_paused = true)]
async fn disks_get_the_spec_rate_limit_or_the_node_default() {
    use vmm_api::{RateLimit, TokenBucket};
    let node_default = RateLimit {
        bytes: Some(TokenBucket {
            per_second: 50 << 20,
            burst: None,
        }),
        ops: None,
    };
    let own = RateLimit {
        bytes: None,
        ops: Some(TokenBucket {
            per_second: 500,
            burst: Some(50),
        }),
    };
    for (spec_limit, want) in [(None, node_default), (Some(own), own)] {
        let mut r = rig(|_| {});
        Arc::get_mut(&mut r.env)
            .expect("the rig's env is not shared yet")
            .default_disk_rate_limit = Some(node_default);
        r.spec.disk_rate_limit = spec_limit;
        let h = InstanceHandle::spawn(
            r.env.clone(),
            r.spec.clone(),
            Vec::new(),
            Desired::Run(r.spec.clone()),
            StartMode::New,
        );
        wait_state(&h, InstanceState::Ready).await;
        let launched = r.launcher.last_spec("one").expect("launched");
        assert!(!launched.disks.is_empty());
        for d in &launched.disks {
            assert_eq!(d.rate_limit, Some(want), "{}", d.serial);
        }
        let vm = crate::backend::process::ProcessLauncher::new(
            crate::backend::process::ProcessLauncherConfig::new("/vmm", "/kernel"),
        )
        .vm_config(&launched);
        assert!(vm.disks.iter().all(|d| d.rate_limit == Some(want)));
    }
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_is_kept_in_the_record_and_a_resumed_task_stays_failed() {
    let r = rig(|p| {
        p.crash_loop_failures = 2;
        p.backoff_initial = Duration::from_millis(100);
    });
    r.launcher.fail_launches(100);
    let h = InstanceHandle::spawn(
        r.env.clone(),
        r.spec.clone(),
        Vec::new(),
        Desired::Run(r.spec.clone()),
        StartMode::New,
    );
    let s = wait_state(&h, InstanceState::Failed).await;
    assert_eq!(s.recent_failures, 2);
    assert!(s
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("crash loop")));
    h.abort();

    // What a restarted agent reads.
    let dir = r.env.instance_dir("one");
    let rec = InstanceRecord::read(&dir)
        .expect("readable")
        .expect("a record");
    assert_eq!(rec.state, InstanceState::Failed);
    assert_eq!(rec.failure_ages_ms.len(), 2);
    assert!(rec
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("crash loop")));

    // Resumed with the same goal: failed, not started again.
    r.launcher.fail_launches(0);
    let tried = r.launcher.launches("one");
    assert_eq!(tried, 2);
    let history = rec.history.clone();
    let h = InstanceHandle::spawn(
        r.env.clone(),
        r.spec.clone(),
        history,
        Desired::Run(r.spec.clone()),
        StartMode::Resume(Box::new(rec)),
    );
    let s = wait_state(&h, InstanceState::Failed).await;
    assert_eq!(s.recent_failures, 2, "the history survived");
    assert!(s
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("crash loop")));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        r.launcher.launches("one"),
        tried,
        "not restarted without a goal change"
    );

    // A new incarnation of the same goal retries it, and ready clears the error.
    h.poke().expect("live task");
    let s = wait_state(&h, InstanceState::Ready).await;
    assert_eq!(r.launcher.launches("one"), tried + 1);
    assert_eq!(s.recent_failures, 0);
    assert_eq!(s.last_error, None, "recovered: the error is cleared");
}

#[test]
#[should_panic(expected = "illegal instance transition")]
fn an_illegal_transition_fails_debug_builds() {
    let r = rig(|_| {});
    let shared = Arc::new(std::sync::Mutex::new(new_shared(&r.spec, Vec::new())));
    let (_tx, rx) = tokio::sync::watch::channel(Desired::Run(r.spec.clone()));
    let (_ctx, crx) = mpsc::channel(1);
    let runner = task::Runner::new(r.env.clone(), r.spec.clone(), shared, rx, crx);
    // Pending -> Ready skips the table.
    runner.go(InstanceState::Ready, "skip ahead");
}
