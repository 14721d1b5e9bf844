//! The ACPI power button. The VMM presses it through a Generic Event Device
//! (`docs/vmm-api.md`, `shutdown acpi`); Linux's `button` driver turns that
//! into a `KEY_POWER` press on the input device named "Power Button", which
//! `evdev` exposes as `/dev/input/eventN`. A watcher thread reads it and raises
//! SIGPWR on PID 1, which starts the same orderly shutdown as a signal from the
//! host: stop the role, sync, unmount, power off.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::probe::say;
use crate::sys;

/// `struct input_event` on x86_64: a 16-byte timeval, then type, code, value.
pub const INPUT_EVENT_LEN: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// The name Linux's ACPI button driver gives the power button's input device.
pub const POWER_BUTTON_NAME: &str = "Power Button";

/// Whether one input event is a press (not a release) of the power key.
pub fn is_power_press(ev: &[u8; INPUT_EVENT_LEN]) -> bool {
    let kind = u16::from_le_bytes([ev[16], ev[17]]);
    let code = u16::from_le_bytes([ev[18], ev[19]]);
    let value = i32::from_le_bytes([ev[20], ev[21], ev[22], ev[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

/// The `/dev/input/eventN` nodes whose device is the power button, found
/// through `<sys_input>/eventN/device/name`.
pub fn find_power_buttons(sys_input: &Path, dev_input: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(sys_input) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            if !name.starts_with("event") {
                return None;
            }
            let dev_name = fs::read_to_string(e.path().join("device/name")).ok()?;
            (dev_name.trim() == POWER_BUTTON_NAME).then(|| dev_input.join(&name))
        })
        .collect();
    found.sort();
    found
}

/// Starts the watcher: it looks for the power button for up to `wait` (the
/// `button` and `evdev` modules create it asynchronously), then reads it until
/// the machine stops. Without a power button it says so and ends.
pub fn spawn_watcher(wait: Duration) {
    let spawned = std::thread::Builder::new()
        .name("power-button".into())
        .spawn(move || {
            let deadline = Instant::now() + wait;
            let devices = loop {
                let d = find_power_buttons(Path::new("/sys/class/input"), Path::new("/dev/input"));
                if !d.is_empty() || Instant::now() >= deadline {
                    break d;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let Some(dev) = devices.into_iter().next() else {
                say("power-button: none found (no ACPI button or the button/evdev modules are missing)");
                return;
            };
            say(&format!("power-button: watching {}", dev.display()));
            watch(&dev);
        });
    if let Err(e) = spawned {
        say(&format!("power-button: cannot start the watcher: {e}"));
    }
}

fn watch(dev: &Path) {
    let mut f = match File::open(dev) {
        Ok(f) => f,
        Err(e) => {
            say(&format!("power-button: cannot open {}: {e}", dev.display()));
            return;
        }
    };
    let mut ev = [0u8; INPUT_EVENT_LEN];
    loop {
        if let Err(e) = f.read_exact(&mut ev) {
            say(&format!(
                "power-button: reading {} failed: {e}",
                dev.display()
            ));
            return;
        }
        if is_power_press(&ev) {
            say("power-button: pressed; shutting down");
            if let Err(e) = sys::raise_signal(libc::SIGPWR) {
                say(&format!("power-button: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; INPUT_EVENT_LEN] {
        let mut ev = [0u8; INPUT_EVENT_LEN];
        ev[16..18].copy_from_slice(&kind.to_le_bytes());
        ev[18..20].copy_from_slice(&code.to_le_bytes());
        ev[20..24].copy_from_slice(&value.to_le_bytes());
        ev
    }

    #[test]
    fn only_a_power_key_press_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 2)), "autorepeat");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, 0, 0)), "EV_SYN");
    }

    #[test]
    fn finds_the_power_button_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (ev, name) in [
            ("event0", "AT Translated Set 2 keyboard"),
            ("event1", "Power Button"),
            ("mouse0", "Power Button"),
        ] {
            let d = dir.path().join(ev).join("device");
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(d.join("name"), format!("{name}\n")).expect("name");
        }
        assert_eq!(
            find_power_buttons(dir.path(), Path::new("/dev/input")),
            vec![PathBuf::from("/dev/input/event1")]
        );
        assert!(find_power_buttons(&dir.path().join("nope"), Path::new("/dev/input")).is_empty());
    }
}
