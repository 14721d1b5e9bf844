//! The VMM's ACPI tables, disassembled by `iasl` (acpica-tools): they must
//! parse, carry valid checksums and say what the platform offers.

use std::process::Command;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::acpi::{self, MmioDeviceInfo};
use vmm_api::platform::mmio;

fn disassemble(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let dat = dir.join(format!("{name}.dat"));
    std::fs::write(&dat, bytes).expect("write table");
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&dat)
        .current_dir(dir)
        .output()
        .expect("run iasl: install acpica-tools (.ci/install-deps does)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iasl failed on {name}: {text}");
    assert!(
        !text.to_lowercase().contains("invalid checksum"),
        "{name}: {text}"
    );
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).expect("iasl wrote .dsl");
    assert!(
        !dsl.to_lowercase().contains("incorrect checksum"),
        "{name}: {dsl}"
    );
    dsl
}

fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let mut len = [0u8; 4];
    mem.read_slice(&mut len, GuestAddress(addr + 4))
        .expect("read length");
    let mut t = vec![0u8; u32::from_le_bytes(len) as usize];
    mem.read_slice(&mut t, GuestAddress(addr))
        .expect("read table");
    t
}

#[test]
fn iasl_accepts_every_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mem");
    let rsdp = acpi::write_tables(&mem, 3, &[]).expect("tables");

    let mut r = [0u8; 36];
    mem.read_slice(&mut r, rsdp).expect("rsdp");
    assert_eq!(&r[..8], b"RSD PTR ");
    // iasl does not disassemble a bare RSDP: check both of its checksums here.
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    assert_eq!(sum(&r[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&r), 0, "RSDP extended checksum");
    assert_eq!(r[15], 2, "RSDP revision 2 (XSDT)");
    assert_eq!(&r[9..15], b"REDDOG");
    let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().expect("8 bytes"));
    let xsdt = read_table(&mem, xsdt_addr);
    let xsdt_dsl = disassemble(dir.path(), "xsdt", &xsdt);
    assert!(xsdt_dsl.contains("XSDT"), "{xsdt_dsl}");

    let entries: Vec<u64> = xsdt[36..]
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    assert_eq!(entries.len(), 2);
    let fadt = read_table(&mem, entries[0]);
    let fadt_dsl = disassemble(dir.path(), "facp", &fadt);
    assert!(fadt_dsl.contains("Hardware Reduced (V5) : 1"), "{fadt_dsl}");
    assert!(fadt_dsl.contains("Sleep Control Register"), "{fadt_dsl}");
    assert!(
        fadt_dsl.contains("0000000000000600"),
        "sleep control port: {fadt_dsl}"
    );
    let madt = read_table(&mem, entries[1]);
    let madt_dsl = disassemble(dir.path(), "apic", &madt);
    assert_eq!(
        madt_dsl.matches("Processor Local APIC").count(),
        3,
        "{madt_dsl}"
    );
    assert!(madt_dsl.contains("I/O APIC"), "{madt_dsl}");

    let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().expect("8 bytes"));
    let dsdt = read_table(&mem, dsdt_addr);
    let dsdt_dsl = disassemble(dir.path(), "dsdt", &dsdt);
    assert!(dsdt_dsl.contains("_S5_"), "{dsdt_dsl}");
    assert!(dsdt_dsl.contains("PNP0501"), "{dsdt_dsl}");
}

#[test]
fn iasl_reads_virtio_mmio_devices_in_the_dsdt() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The first two windows of the platform layout.
    let devs: Vec<MmioDeviceInfo> = (0..2)
        .map(|i| {
            let w = mmio::window(i).expect("in the layout");
            MmioDeviceInfo {
                base: u32::try_from(w.addr).expect("below 4 GiB"),
                len: u32::try_from(mmio::WINDOW_SIZE).expect("4 KiB"),
                irq: w.gsi,
            }
        })
        .collect();
    let dsl = disassemble(dir.path(), "dsdt", &acpi::dsdt(&devs));
    assert_eq!(dsl.matches("\"LNRO0005\"").count(), 2, "{dsl}");
    assert!(dsl.contains(&format!("0x{:08X}", devs[1].base)), "{dsl}");
}

#[test]
fn iasl_reads_the_power_button_and_its_generic_event_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dsl = disassemble(dir.path(), "dsdt", &acpi::dsdt(&[]));
    let squashed: String = dsl.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "Device (_SB.PWRB)",
        "EisaId (\"PNP0C0C\")",
        "Device (_SB.GED0)",
        "\"ACPI0013\"",
        // GED_IRQ (23), edge triggered, active high.
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000017, }",
        // GED_STATUS_PORT, one byte.
        "OperationRegion (GDST, SystemIO, 0x0604, One)",
        "Field (GDST, ByteAcc, NoLock, Preserve) { GDAT, 8 }",
        "Method (_EVT, 1, Serialized)",
        "Local0 = GDAT",
        "If (((Local0 & One) != Zero))",
        "Notify (\\_SB.PWRB, 0x80)",
    ] {
        assert!(squashed.contains(want), "missing {want:?} in {dsl}");
    }
    // The disassembly compiles back without errors or warnings.
    let out = Command::new("iasl")
        .arg("-p")
        .arg("recompiled")
        .arg("dsdt.dsl")
        .current_dir(dir.path())
        .output()
        .expect("run iasl");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("0 Errors, 0 Warnings"), "{text}");
}
