//! API call to first guest heartbeat, through the host agent, beside the same
//! VM booted straight from `reddog-vmm` without the agent.
//!
//! Agent side: the agent library in-process with real backends (reddog-vmm
//! processes, qcow2/ext4 disks, the vsock guest channel) and its REST API on
//! a unix socket, served by `agent::api::serve_unix` as the daemon does. Each
//! run PUTs `/v1/goal` with one new instance (1 vCPU, 64 MiB, the tiny test
//! guest as the guest agent) over the socket and times, from just before the
//! request: the API answer, disks made, `reddog-vmm` spawned (timestamps taken
//! by thin wrappers round the launcher and disk preparer), the `guest_hello`
//! event, the first heartbeat (`heartbeat_seq` set in the instance status,
//! polled every 1 ms in-process) and `ready`. The instance is then removed
//! (untimed) before the next run.
//!
//! Reference: the same `VmConfig` (written by the agent's own launcher code,
//! over disks made once beforehand), spawned directly with our own listener on
//! the vsock socket, timed from the spawn to `Hello` and to the first heartbeat.
//! Runs are interleaved.
//!
//! Usage: `agent-first-heartbeat [--runs N] [--vmm PATH] [--heartbeat-ms MS]`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::{AgentEvent, GoalState, InstanceState};
use anyhow::{bail, Context, Result};
use benches::agent_kit::{cores, find_vmm, ms};
use benches::{summarize, Summary};
use testkit::agent_harness::direct::{DirectSetup, DirectVm};
use testkit::agent_harness::kvm::{KvmAgent, KvmAgentOptions};
use tokio::sync::broadcast::error::RecvError;

const MEMORY_MIB: u32 = 64;
const LIMIT: Duration = Duration::from_secs(30);

/// One run through the agent; every time is from just before the PUT.
#[derive(Debug, Clone, Copy)]
struct AgentSample {
    api: Duration,
    disks_done: Duration,
    launch_called: Duration,
    vmm_spawned: Duration,
    hello: Duration,
    first_heartbeat: Duration,
    ready: Duration,
    /// From the launcher being called to the first heartbeat (the VM's part).
    launch_to_heartbeat: Duration,
}

#[derive(Debug, Clone, Copy)]
struct DirectSample {
    spawned: Duration,
    hello: Duration,
    first_heartbeat: Duration,
}

async fn agent_run(ka: &KvmAgent, run: u64, hb_ms: u32) -> Result<AgentSample> {
    let id = format!("fh-{run}");
    let goal = GoalState {
        incarnation: 2 * run + 1,
        instances: vec![ka.spec(&id, MEMORY_MIB, hb_ms)],
    };
    let mut events = ka.agent.subscribe();
    let t0 = Instant::now();
    let out = ka.put_goal(&goal).await?;
    let api = t0.elapsed();
    if !out["created"]
        .as_array()
        .is_some_and(|c| c.iter().any(|v| v == id.as_str()))
    {
        bail!("PUT /v1/goal did not create {id}: {out}");
    }
    let (mut hello, mut first_hb, mut ready) = (None, None, None);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while hello.is_none() || first_hb.is_none() || ready.is_none() {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(AgentEvent::GuestHello { instance, .. }) if instance == id => {
                    hello.get_or_insert(t0.elapsed());
                }
                Ok(AgentEvent::Transition { instance, transition }) if instance == id => {
                    match transition.to {
                        InstanceState::Ready => { ready.get_or_insert(t0.elapsed()); }
                        InstanceState::Unhealthy | InstanceState::Restarting | InstanceState::Failed => {
                            bail!("{id} went {} ({}); see {}", transition.to, transition.reason, ka.dir().display());
                        }
                        _ => {}
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => bail!("the agent's event channel closed"),
            },
            _ = tick.tick() => {}
        }
        if first_hb.is_none()
            && ka
                .agent
                .instance(&id)
                .is_some_and(|s| s.heartbeat_seq.is_some())
        {
            first_hb = Some(t0.elapsed());
        }
        if t0.elapsed() > LIMIT {
            bail!(
                "{id}: no hello/heartbeat/ready within {LIMIT:?}: {:#?}",
                ka.agent.instance(&id)
            );
        }
    }
    let seams = ka.seams.get(&id);
    let rel = |t: Option<Instant>, what: &str| {
        t.map(|t| t.duration_since(t0))
            .with_context(|| format!("{id}: no {what} timestamp"))
    };
    let first_heartbeat = first_hb.context("first heartbeat")?;
    let launch_start = rel(seams.launch_start, "launch start")?;
    let sample = AgentSample {
        api,
        disks_done: rel(seams.disks_done, "disks done")?,
        launch_called: launch_start,
        vmm_spawned: rel(seams.launch_done, "VMM spawned")?,
        hello: hello.context("hello")?,
        first_heartbeat,
        ready: ready.context("ready")?,
        launch_to_heartbeat: first_heartbeat.saturating_sub(launch_start),
    };

    // Remove it (untimed) so the next run starts from an empty node.
    let out = ka
        .put_goal(&GoalState {
            incarnation: 2 * run + 2,
            instances: vec![],
        })
        .await?;
    if !out["removed"]
        .as_array()
        .is_some_and(|c| c.iter().any(|v| v == id.as_str()))
    {
        bail!("the empty goal did not remove {id}: {out}");
    }
    if ka
        .agent
        .wait_for(&id, LIMIT, |s| s.is_none())
        .await
        .is_some()
    {
        bail!("{id} not removed within {LIMIT:?}");
    }
    Ok(sample)
}

async fn direct_run(vmm: &Path, setup: &DirectSetup, hb_ms: u32) -> Result<DirectSample> {
    let mut vm = DirectVm::start(vmm, setup, LIMIT).await?;
    vm.first_heartbeat(hb_ms, LIMIT).await?;
    let s = DirectSample {
        spawned: vm.spawned,
        hello: vm.hello.context("hello")?,
        first_heartbeat: vm.first_heartbeat.context("heartbeat")?,
    };
    let st = vm.shutdown(Duration::from_secs(10)).await?;
    if !st.success() {
        bail!(
            "the direct VMM exited with {st} after Shutdown; see {}",
            setup.dir.display()
        );
    }
    Ok(s)
}

fn row(side: &str, what: &str, v: &[f64]) -> Result<Summary> {
    let s = summarize(v).context("no samples")?;
    println!(
        "{side:<11} {what:<34} min {:>8.2}  median {:>8.2}  p90 {:>8.2}  max {:>8.2}  ms",
        s.min, s.median, s.p90, s.max
    );
    Ok(s)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut runs = 10u64;
    let mut vmm_arg = None;
    let mut hb_ms = 100u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |what: &str| args.next().with_context(|| format!("{a} needs {what}"));
        match a.as_str() {
            "--runs" => runs = val("a number")?.parse().context("--runs")?,
            "--vmm" => vmm_arg = Some(PathBuf::from(val("a path")?)),
            "--heartbeat-ms" => hb_ms = val("a number")?.parse().context("--heartbeat-ms")?,
            other => bail!(
                "unknown argument {other:?}; usage: agent-first-heartbeat [--runs N] [--vmm PATH] [--heartbeat-ms MS]"
            ),
        }
    }
    if !(1..=1000).contains(&runs) {
        bail!("--runs must be 1..=1000");
    }
    testkit::kvm::check_kvm()?;
    let vmm = find_vmm(vmm_arg)?;
    let mut opts = KvmAgentOptions::new(vmm.clone(), 8, 4096);
    opts.max_instances = 16;
    opts.log_to_file = true;
    opts.configure = Box::new(|cfg| {
        cfg.health.boot_timeout = Duration::from_secs(20);
        cfg.event_capacity = 16_384;
    });
    let ka = KvmAgent::start(opts).await?;
    let setup = DirectSetup::prepare(
        &ka.dir().join("direct"),
        "d",
        &ka.base,
        &ka.role,
        MEMORY_MIB,
        &ka.launcher,
    )
    .await?;
    println!(
        "API call to first heartbeat: test guest (vsock agent), 1 vCPU, {MEMORY_MIB} MiB, 3 disks, \
         {runs} runs each, interleaved; {} cores; vmm {}",
        cores(),
        vmm.display()
    );
    // One warm-up of each (page cache, first-time paths), not counted.
    agent_run(&ka, 0, hb_ms).await.context("warm-up")?;
    direct_run(&vmm, &setup, hb_ms).await.context("warm-up")?;

    let mut a = Vec::new();
    let mut d = Vec::new();
    for run in 1..=runs {
        a.push(
            agent_run(&ka, run, hb_ms)
                .await
                .with_context(|| format!("agent run {run}"))?,
        );
        d.push(
            direct_run(&vmm, &setup, hb_ms)
                .await
                .with_context(|| format!("direct run {run}"))?,
        );
    }
    let col = |f: &dyn Fn(&AgentSample) -> Duration| a.iter().map(|s| ms(f(s))).collect::<Vec<_>>();
    let dcol =
        |f: &dyn Fn(&DirectSample) -> Duration| d.iter().map(|s| ms(f(s))).collect::<Vec<_>>();
    println!("\nthrough the agent (from just before PUT /v1/goal over the unix socket):");
    row("agent", "PUT answered", &col(&|s| s.api))?;
    row("agent", "disks made", &col(&|s| s.disks_done))?;
    let a_pre = row("agent", "launcher called", &col(&|s| s.launch_called))?;
    row("agent", "reddog-vmm spawned", &col(&|s| s.vmm_spawned))?;
    row("agent", "guest hello (event)", &col(&|s| s.hello))?;
    let a_hb = row(
        "agent",
        "first heartbeat (status)",
        &col(&|s| s.first_heartbeat),
    )?;
    row("agent", "ready (event)", &col(&|s| s.ready))?;
    let a_vm = row(
        "agent",
        "launcher called -> first heartbeat",
        &col(&|s| s.launch_to_heartbeat),
    )?;
    println!("\nwithout the agent (reddog-vmm spawned directly, same VmConfig, our listener):");
    row("direct", "reddog-vmm spawned", &dcol(&|s| s.spawned))?;
    row("direct", "guest hello", &dcol(&|s| s.hello))?;
    let d_hb = row("direct", "first heartbeat", &dcol(&|s| s.first_heartbeat))?;
    println!(
        "\nmedian first heartbeat: agent {:.2} ms / direct {:.2} ms = {:.2}x; agent overhead {:.2} ms \
         (of which before the launcher is called: {:.2} ms; launcher call -> first heartbeat {:.2} ms vs direct {:.2} ms)",
        a_hb.median,
        d_hb.median,
        a_hb.median / d_hb.median,
        a_hb.median - d_hb.median,
        a_pre.median,
        a_vm.median,
        d_hb.median
    );
    Ok(())
}
