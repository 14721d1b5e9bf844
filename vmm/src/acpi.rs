//! ACPI tables the VMM writes for the guest: RSDP -> XSDT -> {FADT -> DSDT, MADT}.
//!
//! The platform is "hardware reduced": no legacy PM blocks, power-off through
//! the FADT's sleep control register ([`vmm_api::platform::ACPI_SLEEP_CONTROL_PORT`])
//! with the `SLP_TYP` that the DSDT's `_S5_` object names, reset through the
//! FADT reset register. The tables are placed in the BIOS area right after the
//! RSDP, where Linux also scans for it.

use acpi_tables::{
    aml,
    fadt::{FADTBuilder, Flags},
    gas::{AccessSize, AddressSpace, GAS},
    madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT},
    rsdp::Rsdp,
    sdt::Sdt,
    xsdt::XSDT,
    Aml,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_api::platform;

use crate::arch::layout;

const OEM_ID: [u8; 6] = *b"REDDOG";
const OEM_TABLE_ID: [u8; 8] = *b"REDDOGVM";
const OEM_REVISION: u32 = 1;

/// Errors writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the BIOS area.
    #[error("the ACPI tables ({0} bytes) do not fit in the BIOS area; use fewer vCPUs or devices")]
    TooLarge(usize),
    /// Guest memory refused the write.
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A device the DSDT describes (virtio-mmio devices, filled by the device manager).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Base of its MMIO window.
    pub base: u32,
    /// Size of the window.
    pub len: u32,
    /// Its interrupt (GSI).
    pub irq: u32,
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// The power button (`PNP0C0C`) and the Generic Event Device (`ACPI0013`) that
/// signals it: on the GED's interrupt the guest runs `_EVT`, which reads the
/// status register (clearing it) and notifies the button when its bit is set.
///
/// ```text
/// Device (\_SB.GED0) {
///     Name (_HID, "ACPI0013")
///     Name (_UID, Zero)
///     Name (_CRS, ResourceTemplate () {
///         Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { GED_IRQ } })
///     OperationRegion (GDST, SystemIO, GED_STATUS_PORT, One)
///     Field (GDST, ByteAcc, NoLock, Preserve) { GDAT, 8 }
///     Method (_EVT, 1, Serialized) {
///         Local0 = GDAT
///         If (((Local0 & GED_EVENT_POWER_BUTTON) != Zero)) { Notify (\_SB.PWRB, 0x80) }
///     }
/// }
/// Device (\_SB.PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, Zero) }
/// ```
fn power_button_and_ged(body: &mut Vec<u8>) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    aml::Device::new("_SB_.PWRB".into(), vec![&hid, &uid]).to_aml_bytes(body);

    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, platform::GED_IRQ);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemIO,
        &platform::GED_STATUS_PORT,
        &aml::ONE,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&aml::Local(0), &gdat);
    // Target Zero (NullName): the result is only tested.
    let bit = aml::And::new(
        &aml::ZERO,
        &aml::Local(0),
        &platform::GED_EVENT_POWER_BUTTON,
    );
    let pressed = aml::NotEqual::new(&bit, &aml::ZERO);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify_value: u8 = 0x80;
    let notify = aml::Notify::new(&pwrb, &notify_value);
    let check = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &check]);
    aml::Device::new(
        "_SB_.GED0".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    )
    .to_aml_bytes(body);
}

/// The DSDT: `_S5_` for power-off, the serial port, the power button and its
/// Generic Event Device, and one `LNRO0005` device per virtio-mmio window.
pub fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body: Vec<u8> = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&platform::ACPI_S5_SLP_TYP, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);

    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let irq = aml::Interrupt::new(true, true, false, false, platform::SERIAL_IRQ);
    let io = aml::IO::new(platform::SERIAL_PORT_BASE, platform::SERIAL_PORT_BASE, 1, 8);
    let res = aml::ResourceTemplate::new(vec![&irq, &io]);
    let crs = aml::Name::new("_CRS".into(), &res);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    com1.to_aml_bytes(&mut body);

    power_button_and_ged(&mut body);

    for (i, d) in devices.iter().enumerate() {
        let name = format!("_SB_.V{i:03X}");
        let uid = i as u32;
        let mem = aml::Memory32Fixed::new(true, d.base, d.len);
        let irq = aml::Interrupt::new(true, true, false, false, d.irq);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &uid);
        let cca = aml::Name::new("_CCA".into(), &aml::ONE);
        let crs = aml::Name::new("_CRS".into(), &crs);
        aml::Device::new(name.as_str().into(), vec![&hid, &uid, &cca, &crs])
            .to_aml_bytes(&mut body);
    }

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The FADT for a hardware-reduced platform whose DSDT is at `dsdt_addr`.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.sleep_control_reg = io_gas(platform::ACPI_SLEEP_CONTROL_PORT);
    f.sleep_status_reg = io_gas(platform::ACPI_SLEEP_STATUS_PORT);
    f.reset_reg = io_gas(platform::ACPI_RESET_PORT);
    f.reset_value = platform::ACPI_RESET_VALUE;
    // "No VGA", "no CMOS RTC" in IAPC_BOOT_ARCH.
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"REDDOGVM").into();
    to_bytes(&f.finalize())
}

/// The MADT: one local APIC per vCPU (APIC ID = vCPU index) and the IOAPIC.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR),
    );
    for i in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, layout::IOAPIC_ADDR, 0));
    to_bytes(&m)
}

/// Writes every table into guest memory; returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<GuestAddress, AcpiError> {
    // Layout: RSDP, then XSDT, FADT, MADT, DSDT, each 16-byte aligned.
    let align = |x: u64| (x + 15) & !15;
    let rsdp_addr = platform::RSDP_ADDR;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let xsdt_len = 36 + 8 * 2;
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let dsdt_bytes = dsdt(devices);
    let fadt_bytes = fadt(0); // length only; rebuilt below with the real address
    let madt_addr = align(fadt_addr + fadt_bytes.len() as u64);
    let madt_bytes = madt(vcpus);
    let dsdt_addr = align(madt_addr + madt_bytes.len() as u64);
    let end = dsdt_addr + dsdt_bytes.len() as u64;
    if end > layout::HIMEM_START {
        return Err(AcpiError::TooLarge((end - rsdp_addr) as usize));
    }
    let fadt_bytes = fadt(dsdt_addr);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_bytes = to_bytes(&xsdt);
    debug_assert_eq!(xsdt_bytes.len() as u64, xsdt_len);

    let rsdp_bytes = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (bytes, addr) in [
        (&rsdp_bytes, rsdp_addr),
        (&xsdt_bytes, xsdt_addr),
        (&fadt_bytes, fadt_addr),
        (&madt_bytes, madt_addr),
        (&dsdt_bytes, dsdt_addr),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        let dev = MmioDeviceInfo {
            base: vmm_api::platform::mmio::BASE as u32,
            len: vmm_api::platform::mmio::WINDOW_SIZE as u32,
            irq: vmm_api::platform::mmio::FIRST_GSI,
        };
        for t in [dsdt(&[dev]), fadt(0x1234), madt(4)] {
            assert!(checksum_ok(&t), "bad checksum in {:?}", &t[..4]);
            let len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize;
            assert_eq!(len, t.len());
        }
        // MADT: 44-byte header, 4 local APICs, 1 IOAPIC.
        assert_eq!(madt(4).len(), 44 + 4 * 8 + 12);
    }

    #[test]
    fn tables_fit_for_max_vcpus() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mem");
        let rsdp = write_tables(&mem, vmm_api::config::MAX_VCPUS, &[]).expect("fit");
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).expect("read");
        assert_eq!(&sig, b"RSD PTR ");
    }
}
