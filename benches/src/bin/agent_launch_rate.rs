//! Launch and teardown rate through the host agent: K instances in one goal
//! state, PUT over the REST API's unix socket, timed until every one is
//! `ready`; then the empty goal, timed until every one is removed (VMM gone,
//! disks deleted). Beside it, the same K VMs spawned straight from
//! `reddog-vmm` (same `VmConfig`, disks made beforehand, our own vsock
//! listeners) timed until every first heartbeat, and Firecracker's design
//! figure, cited (not measured here).
//!
//! The agent runs in-process with real backends (see `agent_kit`); instances
//! have 1 vCPU, 64 MiB and a 1 s heartbeat interval.
//!
//! Usage: `agent-launch-rate [--counts 10,20,40] [--vmm PATH] [--no-direct]`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::{AgentEvent, GoalState, InstanceState};
use anyhow::{bail, Context, Result};
use benches::agent_kit::{cores, cpu_time_self, find_vmm, ms};
use benches::summarize;
use testkit::agent_harness::direct::{DirectSetup, DirectVm};
use testkit::agent_harness::kvm::{KvmAgent, KvmAgentOptions};
use tokio::sync::broadcast::error::RecvError;

const MEMORY_MIB: u32 = 64;
const HEARTBEAT_MS: u32 = 1000;
/// Firecracker's design document (docs/design.md, "Features"): "a steady
/// mutation rate of 5 microVMs per host core per second" (minimal Linux
/// kernel, 1 vCPU, 128 MiB).
const FIRECRACKER_PER_CORE_PER_SEC: f64 = 5.0;

struct Launch {
    ready_all: Duration,
    ready_median: Duration,
    ready_first: Duration,
    agent_cpu: Duration,
    teardown: Duration,
    teardown_cpu: Duration,
}

async fn agent_launch(
    ka: &KvmAgent,
    k: usize,
    incarnation: &mut u64,
    limit: Duration,
) -> Result<Launch> {
    let ids: Vec<String> = (0..k).map(|i| format!("lr{k}-{i}")).collect();
    *incarnation += 1;
    let goal = GoalState {
        incarnation: *incarnation,
        instances: ids
            .iter()
            .map(|id| ka.spec(id, MEMORY_MIB, HEARTBEAT_MS))
            .collect(),
    };
    let mut events = ka.agent.subscribe();
    let cpu0 = cpu_time_self();
    let t0 = Instant::now();
    let out = ka.put_goal(&goal).await?;
    let created = out["created"].as_array().map_or(0, Vec::len);
    if created != k {
        bail!("PUT /v1/goal created {created} of {k}: {out}");
    }
    let mut ready: BTreeMap<String, Duration> = BTreeMap::new();
    while ready.len() < k {
        let left = limit
            .checked_sub(t0.elapsed())
            .with_context(|| format!("only {} of {k} ready within {limit:?}", ready.len()))?;
        match tokio::time::timeout(left, events.recv()).await {
            Err(_) => bail!("only {} of {k} ready within {limit:?}", ready.len()),
            Ok(Ok(AgentEvent::Transition {
                instance,
                transition,
            })) => match transition.to {
                InstanceState::Ready => {
                    ready.entry(instance).or_insert(t0.elapsed());
                }
                InstanceState::Unhealthy | InstanceState::Restarting | InstanceState::Failed => {
                    bail!(
                        "{instance} went {} ({}) while launching {k}; see {}",
                        transition.to,
                        transition.reason,
                        ka.dir().display()
                    )
                }
                _ => {}
            },
            Ok(Ok(_)) => {}
            Ok(Err(RecvError::Lagged(n))) => bail!("the event subscriber lagged by {n}"),
            Ok(Err(RecvError::Closed)) => bail!("the agent's event channel closed"),
        }
    }
    let ready_all = t0.elapsed();
    let agent_cpu = cpu_time_self().saturating_sub(cpu0);
    let mut pids = Vec::new();
    for id in &ids {
        let s = ka
            .agent
            .instance(id)
            .with_context(|| format!("{id} gone"))?;
        if s.state != InstanceState::Ready || s.restarts != 0 {
            bail!("{id}: {:?} with {} restarts", s.state, s.restarts);
        }
        pids.push(s.vmm_pid.with_context(|| format!("{id}: no VMM pid"))?);
    }
    let times: Vec<f64> = ready.values().map(|d| ms(*d)).collect();
    let sum = summarize(&times).context("no samples")?;

    // Teardown: the empty goal until every instance is removed.
    *incarnation += 1;
    let mut events = ka.agent.subscribe();
    let cpu1 = cpu_time_self();
    let t1 = Instant::now();
    let out = ka
        .put_goal(&GoalState {
            incarnation: *incarnation,
            instances: vec![],
        })
        .await?;
    let removed = out["removed"].as_array().map_or(0, Vec::len);
    if removed != k {
        bail!("the empty goal removed {removed} of {k}: {out}");
    }
    let mut gone: BTreeSet<String> = BTreeSet::new();
    while gone.len() < k {
        let left = limit
            .checked_sub(t1.elapsed())
            .with_context(|| format!("only {} of {k} removed within {limit:?}", gone.len()))?;
        match tokio::time::timeout(left, events.recv()).await {
            Err(_) => bail!("only {} of {k} removed within {limit:?}", gone.len()),
            Ok(Ok(AgentEvent::InstanceRemoved { instance })) => {
                gone.insert(instance);
            }
            Ok(Ok(_)) => {}
            Ok(Err(RecvError::Lagged(n))) => bail!("the event subscriber lagged by {n}"),
            Ok(Err(RecvError::Closed)) => bail!("the agent's event channel closed"),
        }
    }
    let teardown = t1.elapsed();
    let teardown_cpu = cpu_time_self().saturating_sub(cpu1);
    for p in pids {
        if std::path::Path::new(&format!("/proc/{p}")).exists() {
            bail!("VMM {p} still exists after its instance was removed");
        }
    }
    Ok(Launch {
        ready_all,
        ready_median: Duration::from_secs_f64(sum.median / 1000.0),
        ready_first: Duration::from_secs_f64(sum.min / 1000.0),
        agent_cpu,
        teardown,
        teardown_cpu,
    })
}

/// K VMs spawned at once without the agent; time until every first heartbeat.
async fn direct_launch(
    vmm: &Path,
    setups: &[DirectSetup],
    limit: Duration,
) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for s in setups.iter().cloned() {
        let vmm = vmm.to_path_buf();
        set.spawn(async move {
            let mut vm = DirectVm::start(&vmm, &s, limit).await?;
            vm.first_heartbeat(HEARTBEAT_MS, limit).await?;
            Ok::<_, anyhow::Error>((vm, s))
        });
    }
    let mut vms = Vec::new();
    while let Some(r) = set.join_next().await {
        vms.push(r.context("direct VM task")??);
    }
    let all = t0.elapsed();
    let t1 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (vm, s) in vms {
        set.spawn(async move {
            let st = vm.shutdown(Duration::from_secs(20)).await?;
            if !st.success() {
                bail!("direct VMM exited with {st}; see {}", s.dir.display());
            }
            Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("direct VM task")??;
    }
    Ok((all, t1.elapsed()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut counts = vec![10usize, 20, 40];
    let mut vmm_arg = None;
    let mut direct = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |what: &str| args.next().with_context(|| format!("{a} needs {what}"));
        match a.as_str() {
            "--counts" => {
                counts = val("a list")?
                    .split(',')
                    .map(|c| c.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--counts: comma-separated numbers")?
            }
            "--vmm" => vmm_arg = Some(PathBuf::from(val("a path")?)),
            "--no-direct" => direct = false,
            other => bail!(
                "unknown argument {other:?}; usage: agent-launch-rate [--counts 10,20,40] [--vmm PATH] [--no-direct]"
            ),
        }
    }
    if counts.is_empty() || counts.iter().any(|&k| !(1..=100).contains(&k)) {
        bail!("--counts: each 1..=100 (64 MiB each)");
    }
    testkit::kvm::check_kvm()?;
    let vmm = find_vmm(vmm_arg)?;
    let max = counts.iter().copied().max().unwrap_or(1);
    let mut opts =
        KvmAgentOptions::new(vmm.clone(), max as u32, max as u64 * u64::from(MEMORY_MIB));
    opts.max_instances = max;
    opts.log_to_file = true;
    opts.configure = Box::new(|cfg| {
        cfg.health.boot_timeout = Duration::from_secs(60);
        cfg.event_capacity = 16_384;
    });
    let ka = KvmAgent::start(opts).await?;
    let ncores = cores();
    println!(
        "launch rate: K instances in one goal (PUT /v1/goal over the unix socket) until all ready, \
         then the empty goal until all removed; test guest, 1 vCPU, {MEMORY_MIB} MiB, 3 disks each; \
         {ncores} cores; vmm {}",
        vmm.display()
    );
    let mut setups = Vec::new();
    if direct {
        for i in 0..max {
            setups.push(
                DirectSetup::prepare(
                    &ka.dir().join("direct"),
                    &format!("d{i}"),
                    &ka.base,
                    &ka.role,
                    MEMORY_MIB,
                    &ka.launcher,
                )
                .await?,
            );
        }
    }
    let mut incarnation = 0u64;
    // Warm-up (page cache, first-time paths), not counted.
    agent_launch(&ka, 2, &mut incarnation, Duration::from_secs(60))
        .await
        .context("warm-up")?;
    println!(
        "\n{:>4} | {:>10} {:>10} {:>10} {:>9} {:>10} {:>11} | {:>10} {:>9} {:>11} | {:>10} {:>9}",
        "K",
        "all ready",
        "first",
        "median",
        "inst/s",
        "inst/s/core",
        "agent CPU/inst",
        "teardown",
        "inst/s",
        "agent CPU/inst",
        "direct all",
        "inst/s",
    );
    for &k in &counts {
        let limit = Duration::from_secs(30 + 3 * k as u64);
        let l = agent_launch(&ka, k, &mut incarnation, limit)
            .await
            .with_context(|| format!("launching {k}"))?;
        let (d_all, _d_down) = if direct {
            direct_launch(&vmm, &setups[..k], limit)
                .await
                .with_context(|| format!("direct launch of {k}"))?
        } else {
            (Duration::ZERO, Duration::ZERO)
        };
        let rate = k as f64 / l.ready_all.as_secs_f64();
        let down = k as f64 / l.teardown.as_secs_f64();
        println!(
            "{k:>4} | {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>9.1} {:>10.1} {:>12.2}ms | {:>8.0}ms {:>9.1} {:>12.2}ms | {:>8.0}ms {:>9}",
            ms(l.ready_all),
            ms(l.ready_first),
            ms(l.ready_median),
            rate,
            rate / ncores as f64,
            ms(l.agent_cpu) / k as f64,
            ms(l.teardown),
            down,
            ms(l.teardown_cpu) / k as f64,
            ms(d_all),
            if direct {
                format!("{:.1}", k as f64 / d_all.as_secs_f64())
            } else {
                "-".into()
            },
        );
    }
    println!(
        "\nreference (CITED, not measured here): Firecracker docs/design.md: \"a steady mutation rate of \
         {FIRECRACKER_PER_CORE_PER_SEC} microVMs per host core per second\" (minimal Linux kernel, 1 vCPU, \
         128 MiB; 180/s on 36 cores) = {:.0} inst/s on {ncores} cores",
        FIRECRACKER_PER_CORE_PER_SEC * ncores as f64
    );
    println!(
        "columns: times from just before the PUT; agent CPU = getrusage(RUSAGE_SELF) of this process \
         (the agent, its API server and the bench's event loop; VMMs are child processes, not counted); \
         direct = the same K VMs spawned at once without the agent until every first heartbeat"
    );
    Ok(())
}
