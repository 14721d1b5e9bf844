//! Builds the test guest from `guest/` with gcc and GNU binutils:
//!
//! 1. compile `entry.S`, `main.c`, `agent.c` and `net.c` once, with reddog-vmm's
//!    virtio-mmio layout (`vmm_api::platform::mmio`) as `-D` definitions;
//! 2. link them twice with `guest.ld.S` (run through the preprocessor): with the
//!    PVH note (`test-guest-pvh.elf`) and without (`test-guest-nopvh.elf`);
//! 3. `objcopy -O binary` the note-less ELF into a flat payload and put a Linux
//!    setup header in front of it (`test-guest.bzImage`).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// Where the guest is linked (must match `LOAD_ADDR` in `guest/guest.h`).
const LOAD_ADDR: u64 = 0x10_0000;
/// Longest command line the guest reads (must match `CMDLINE_MAX` in `guest/guest.h`).
const CMDLINE_MAX: u32 = 4095;
/// Setup sectors after the boot sector: the setup part of the bzImage is (1 + 1) * 512 bytes.
const SETUP_SECTS: u8 = 1;

/// What is compiled and linked, in link order (`entry.S` first: it holds the entry points).
const SOURCES: &[&str] = &["entry.S", "main.c", "agent.c", "net.c"];

const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-builtin",
    "-fno-delete-null-pointer-checks",
    "-fno-tree-loop-distribute-patterns",
    "-O2",
    "-Wall",
    "-Wextra",
];

const LDFLAGS: &[&str] = &[
    "-m",
    "elf_x86_64",
    "-nostdlib",
    "-static",
    "-z",
    "noexecstack",
    "--no-warn-rwx-segments",
];

type Result<T> = std::result::Result<T, String>;

fn main() {
    if let Err(e) = build() {
        eprintln!("error: test-guest: {e}");
        exit(1);
    }
}

struct Tools {
    cc: String,
    ld: String,
    objcopy: String,
}

fn tool(var: &str, default: &str) -> String {
    println!("cargo:rerun-if-env-changed={var}");
    env::var(var).unwrap_or_else(|_| default.to_string())
}

fn build() -> Result<()> {
    let manifest_dir = PathBuf::from(
        env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?,
    );
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let src = manifest_dir.join("guest");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=guest");
    for entry in fs::read_dir(&src).map_err(|e| format!("reading {}: {e}", src.display()))? {
        let entry = entry.map_err(|e| format!("reading {}: {e}", src.display()))?;
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let tools = Tools {
        cc: tool("TEST_GUEST_CC", "gcc"),
        ld: tool("TEST_GUEST_LD", "ld"),
        objcopy: tool("TEST_GUEST_OBJCOPY", "objcopy"),
    };
    check_tool(&tools.cc)?;

    let include = format!("-I{}", src.display());
    let layout = mmio_layout_defines();
    let mut objects = Vec::new();
    for source in SOURCES {
        let object = out.join(Path::new(source).with_extension("o"));
        let mut cmd = Command::new(&tools.cc);
        cmd.args(CFLAGS)
            .arg(&include)
            .args(&layout)
            .arg("-c")
            .arg(src.join(source))
            .arg("-o")
            .arg(&object);
        run(&mut cmd)?;
        objects.push(object);
    }

    let pvh_elf = out.join("test-guest-pvh.elf");
    let nopvh_elf = out.join("test-guest-nopvh.elf");
    for (script, elf, defines) in [
        ("pvh.ld", &pvh_elf, &["-DPVH_NOTE"][..]),
        ("nopvh.ld", &nopvh_elf, &[][..]),
    ] {
        let script = out.join(script);
        let mut cpp = Command::new(&tools.cc);
        cpp.args(["-E", "-P", "-x", "c", "-undef"])
            .arg(&include)
            .args(defines)
            .arg(src.join("guest.ld.S"))
            .arg("-o")
            .arg(&script);
        run(&mut cpp)?;
        let mut ld = Command::new(&tools.ld);
        ld.args(LDFLAGS)
            .arg("-T")
            .arg(&script)
            .arg("-o")
            .arg(elf)
            .args(&objects);
        run(&mut ld)?;
    }

    let flat = out.join("test-guest.bin");
    let mut objcopy = Command::new(&tools.objcopy);
    objcopy.args(["-O", "binary"]).arg(&nopvh_elf).arg(&flat);
    run(&mut objcopy)?;

    let payload = read(&flat)?;
    let image_end = load_end(&read(&nopvh_elf)?)?;
    let init_size = image_end
        .checked_sub(LOAD_ADDR)
        .and_then(|size| u32::try_from(size).ok())
        .ok_or_else(|| {
            format!("guest image ends at {image_end:#x}, below or far above {LOAD_ADDR:#x}")
        })?;
    let mut bzimage = setup_header(payload.len(), init_size)?;
    bzimage.extend_from_slice(&payload);
    let bzimage_path = out.join("test-guest.bzImage");
    fs::write(&bzimage_path, bzimage)
        .map_err(|e| format!("writing {}: {e}", bzimage_path.display()))
}

/// reddog-vmm's virtio-mmio layout, the contract in `vmm_api::platform::mmio`,
/// as preprocessor definitions for the guest's vsock agent (`guest/agent.c`).
fn mmio_layout_defines() -> Vec<String> {
    use vmm_api::platform::mmio;
    vec![
        format!("-DVMM_MMIO_BASE={:#x}ull", mmio::BASE),
        format!("-DVMM_MMIO_WINDOW={:#x}", mmio::WINDOW_SIZE),
        format!("-DVMM_FIRST_GSI={}", mmio::FIRST_GSI),
        format!("-DVMM_MMIO_MAX_DEVICES={}", mmio::MAX_DEVICES),
    ]
}

fn check_tool(cc: &str) -> Result<()> {
    match Command::new(cc).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("`{cc} --version` failed with {}", o.status)),
        Err(e) => Err(format!(
            "cannot run `{cc}` ({e}). The test guest is built from C and assembly with gcc \
             and GNU binutils (ld, objcopy): install them (Debian: `apt-get install gcc binutils`) \
             or point TEST_GUEST_CC / TEST_GUEST_LD / TEST_GUEST_OBJCOPY at them."
        )),
    }
}

/// Runs a build command; fails with its command line and output, and passes
/// on whatever it printed (compiler warnings) as cargo warnings.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("{shown} failed with {}:\n{stderr}", output.status));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={line}");
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

fn le_u16(b: &[u8], off: usize) -> Result<u16> {
    b.get(off..off + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or_else(|| format!("ELF truncated at {off:#x}"))
}

fn le_u32(b: &[u8], off: usize) -> Result<u32> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| format!("ELF truncated at {off:#x}"))
}

fn le_u64(b: &[u8], off: usize) -> Result<u64> {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| format!("ELF truncated at {off:#x}"))
}

/// The end (physical address) of the last PT_LOAD segment in memory, .bss included.
fn load_end(elf: &[u8]) -> Result<u64> {
    const PT_LOAD: u32 = 1;
    let phoff = usize::try_from(le_u64(elf, 0x20)?).map_err(|e| e.to_string())?;
    let phentsize = usize::from(le_u16(elf, 0x36)?);
    let phnum = usize::from(le_u16(elf, 0x38)?);
    let mut end = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if le_u32(elf, ph)? == PT_LOAD {
            end = end.max(le_u64(elf, ph + 0x18)? + le_u64(elf, ph + 0x28)?);
        }
    }
    Ok(end)
}

/// The setup sectors of a bzImage (Linux boot protocol 2.15) whose protected-mode
/// part is the flat guest loaded at 1 MiB, entered at +0x200 in 64-bit mode.
fn setup_header(payload_len: usize, init_size: u32) -> Result<Vec<u8>> {
    let mut s = vec![0u8; (usize::from(SETUP_SECTS) + 1) * 512];
    let syssize = u32::try_from(payload_len.div_ceil(16))
        .map_err(|_| "guest payload too large".to_string())?;
    let put = |s: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        s[off..off + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut s, 0x1f1, &[SETUP_SECTS]); // setup_sects
    put(&mut s, 0x1f4, &syssize.to_le_bytes()); // syssize, 16-byte units
    put(&mut s, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(&mut s, 0x200, &[0xeb, 0x7e]); // jump to 0x280: real-mode entry is not supported
    put(&mut s, 0x202, b"HdrS"); // header magic
    put(&mut s, 0x206, &0x020fu16.to_le_bytes()); // version 2.15
    put(&mut s, 0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(&mut s, 0x214, &(LOAD_ADDR as u32).to_le_bytes()); // code32_start
    put(&mut s, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut s, 0x230, &0x1000u32.to_le_bytes()); // kernel_alignment
    put(&mut s, 0x236, &0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut s, 0x238, &CMDLINE_MAX.to_le_bytes()); // cmdline_size
    put(&mut s, 0x258, &LOAD_ADDR.to_le_bytes()); // pref_address
    put(&mut s, 0x260, &init_size.to_le_bytes()); // init_size (image + .bss)
    put(&mut s, 0x280, &[0xfa, 0xf4, 0xeb, 0xfd]); // cli; 1: hlt; jmp 1b (16-bit)
    Ok(s)
}
