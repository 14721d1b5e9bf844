//! The whole host agent with a real Debian guest, on real KVM inside a
//! QEMU-TCG machine (see `nested_linux.rs` and docs/testing.md): the static
//! `reddog-agent` starts in the outer machine, `reddog cache import` puts the
//! OS base image in its cache, `reddog goal put` asks for one web-role
//! instance; the agent makes its disks (qcow2 overlay, ext4 resource and role
//! disks: `mkfs.ext4` is copied in with its libraries), starts `reddog-vmm`,
//! the guest's `reddog-guest` says hello and starts busybox httpd, the
//! instance becomes `ready` and heartbeats arrive; an empty goal then stops
//! it: the agent sends `Shutdown`, the guest powers off through ACPI S5 and
//! the VMM exits 0. The driver (`agent-driver`) prints each phase with its
//! time; the agent's log, the VMM's log and the guest console come back as
//! separate files.
//!
//! One outer machine, ~40-60 s warm. Run:
//! `cargo test -p testkit --test nested_agent -- --nocapture`.

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use testkit::agent_scenario::{self, AgentScenario};

#[test]
fn agent_runs_a_web_instance_to_ready_and_stops_it_cleanly() {
    let started = Instant::now();
    let a = agent_scenario::prepare(&mut |step| {
        eprintln!("[{:5.1}s] {step}", started.elapsed().as_secs_f64());
    })
    .unwrap_or_else(|e| panic!("artifacts: {e}"));
    let prepared = started.elapsed();
    eprintln!(
        "artifacts ready in {:.1} s (guest modules {:?})",
        prepared.as_secs_f64(),
        a.modules
    );
    let scenario = AgentScenario {
        timeout_secs: 150,
        ..AgentScenario::web(1)
    };
    let run = agent_scenario::run_nested(&a, &scenario, |line| eprintln!("driver: {line}"))
        .unwrap_or_else(|e| panic!("nested run: {e}"));
    let s = &run.summary;
    eprintln!(
        "outer machine {:.1} s, whole test {:.1} s (artifacts {:.1} s)\n{}",
        run.elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        prepared.as_secs_f64(),
        s.describe()
    );
    let all = run.describe();
    assert!(s.ok, "the driver reports a failure\n{all}");
    assert!(s.image.starts_with("sha256:"), "{all}");
    assert_eq!(s.instances.len(), 1, "{all}");
    let i = &s.instances[0];
    assert_eq!(i.id, "web-1");
    // The whole way up, in order, without restarts, except after a triple
    // fault of the nested emulator (docs/testing.md), which is said plainly;
    // a restart for any other reason fails.
    let states: Vec<&str> = i.states.iter().map(|x| x.state.as_str()).collect();
    match run.explain_restarts(true) {
        Ok(notes) if notes.is_empty() => assert_eq!(
            states,
            ["preparing_disks", "starting", "booted", "ready"],
            "{all}"
        ),
        Ok(notes) => {
            for n in &notes {
                eprintln!("NOTE: {n}");
            }
            assert_eq!(states.first(), Some(&"preparing_disks"), "{all}");
            assert_eq!(states.last(), Some(&"ready"), "{all}");
        }
        Err(e) => panic!("{e}\n{all}"),
    }
    assert!(
        i.guest_agent
            .as_deref()
            .is_some_and(|g| g.starts_with("reddog-guest")),
        "{all}"
    );
    assert!(i.heartbeats >= 3, "{} heartbeats\n{all}", i.heartbeats);
    assert_eq!(i.role_state.as_deref(), Some("ready"), "{all}");
    assert!(s.instances_table.contains("web-1"), "{all}");
    // The way down: stopping, stopped, and the VMM powered off (ACPI S5).
    let stop: Vec<&str> = i.stop_states.iter().map(|x| x.state.as_str()).collect();
    assert_eq!(stop, ["stopping", "stopped"], "{all}");
    assert_eq!(i.vmm_status, Some(0), "{all}");
    assert!(
        i.vmm_exit
            .as_deref()
            .is_some_and(|e| e.contains("PowerOff")),
        "{all}"
    );
    // The logs came back apart: the guest's console, the VMM's log, the agent's.
    let serial = run.log("web-1.serial");
    for want in [
        "reddog-guest: mode agent",
        "reddog-guest: role ready: pid",
        "reddog-guest: shutdown requested",
        "reddog-guest: poweroff",
    ] {
        assert!(serial.contains(want), "serial lacks {want:?}\n{all}");
    }
    assert!(
        !serial.contains("unknown option reddog."),
        "the agent's command line has an option the guest does not know\n{all}"
    );
    assert!(run.log("agent.log").contains("\"transition\""), "{all}");
    // The goal's environment reached the role (through the role disk's
    // instance file), and the role's output came back to the agent's log.
    assert!(
        run.log("agent.log")
            .contains("web role: instance=web-1 role=web greeting=hello-from-the-goal"),
        "the role did not print the instance's environment\n{all}"
    );
    assert!(run.logs.contains_key("web-1.vmm.log"), "{all}");
}
