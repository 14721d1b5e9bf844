//! Just enough ELF64 (little-endian) reading for the image artifacts: program
//! headers (is a binary static? does a kernel carry the PVH note?) and sections
//! (a kernel module's `.modinfo`). Every offset is bounds-checked: the input is a
//! downloaded file.

use thiserror::Error;

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// Xen ELF note type carrying the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF64 little-endian x86_64 file (bad magic, class or machine): is this the right file?")]
    NotElf64,
    #[error("ELF structure out of bounds ({what}): the file is truncated or corrupt; delete it and fetch it again")]
    OutOfBounds { what: &'static str },
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn oob(what: &'static str) -> ElfError {
    ElfError::OutOfBounds { what }
}

/// One program header.
#[derive(Debug, Clone, Copy)]
pub struct Phdr {
    pub kind: u32,
    pub offset: usize,
    pub filesz: usize,
}

/// One section header (name resolved).
#[derive(Debug, Clone)]
pub struct Section {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// A parsed view of an ELF64 file.
pub struct Elf<'a> {
    bytes: &'a [u8],
}

impl<'a> Elf<'a> {
    /// Checks the identification bytes (ELF64, little-endian, x86_64).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        let ok = bytes.get(0..4) == Some(b"\x7fELF".as_slice())
            && bytes.get(4) == Some(&2)
            && bytes.get(5) == Some(&1)
            && u16_at(bytes, 18) == Some(62);
        if ok {
            Ok(Self { bytes })
        } else {
            Err(ElfError::NotElf64)
        }
    }

    pub fn program_headers(&self) -> Result<Vec<Phdr>, ElfError> {
        let b = self.bytes;
        let phoff = u64_at(b, 32).ok_or(oob("e_phoff"))?;
        let phentsize = u16_at(b, 54).ok_or(oob("e_phentsize"))?;
        let phnum = u16_at(b, 56).ok_or(oob("e_phnum"))?;
        let phoff = usize::try_from(phoff).map_err(|_| oob("e_phoff"))?;
        let mut out = Vec::with_capacity(usize::from(phnum));
        for i in 0..usize::from(phnum) {
            let at = phoff
                .checked_add(i * usize::from(phentsize))
                .ok_or(oob("program header"))?;
            let kind = u32_at(b, at).ok_or(oob("p_type"))?;
            let offset = u64_at(b, at.saturating_add(8)).ok_or(oob("p_offset"))?;
            let filesz = u64_at(b, at.saturating_add(32)).ok_or(oob("p_filesz"))?;
            out.push(Phdr {
                kind,
                offset: usize::try_from(offset).map_err(|_| oob("p_offset"))?,
                filesz: usize::try_from(filesz).map_err(|_| oob("p_filesz"))?,
            });
        }
        Ok(out)
    }

    /// Whether a `PT_INTERP` header is present (a dynamically linked executable).
    pub fn has_interpreter(&self) -> Result<bool, ElfError> {
        Ok(self.program_headers()?.iter().any(|p| p.kind == PT_INTERP))
    }

    /// Whether a `PT_NOTE` segment carries the Xen PVH entry note
    /// (`XEN_ELFNOTE_PHYS32_ENTRY`, owner "Xen").
    pub fn has_pvh_note(&self) -> Result<bool, ElfError> {
        for p in self.program_headers()?.iter().filter(|p| p.kind == PT_NOTE) {
            let end = p.offset.checked_add(p.filesz).ok_or(oob("note segment"))?;
            let notes = self.bytes.get(p.offset..end).ok_or(oob("note segment"))?;
            let mut at = 0usize;
            while at.saturating_add(12) <= notes.len() {
                let namesz = u32_at(notes, at).ok_or(oob("note"))? as usize;
                let descsz = u32_at(notes, at.saturating_add(4)).ok_or(oob("note"))? as usize;
                let kind = u32_at(notes, at.saturating_add(8)).ok_or(oob("note"))?;
                let name_at = at.saturating_add(12);
                let name = notes
                    .get(name_at..name_at.checked_add(namesz).ok_or(oob("note name"))?)
                    .ok_or(oob("note name"))?;
                if kind == XEN_ELFNOTE_PHYS32_ENTRY && name.starts_with(b"Xen") {
                    return Ok(true);
                }
                let desc_at = name_at + namesz.next_multiple_of(4);
                at = desc_at
                    .checked_add(descsz.next_multiple_of(4))
                    .ok_or(oob("note"))?;
            }
        }
        Ok(false)
    }

    pub fn sections(&self) -> Result<Vec<Section>, ElfError> {
        let b = self.bytes;
        let shoff = u64_at(b, 40).ok_or(oob("e_shoff"))?;
        let shentsize = usize::from(u16_at(b, 58).ok_or(oob("e_shentsize"))?);
        let shnum = usize::from(u16_at(b, 60).ok_or(oob("e_shnum"))?);
        let shstrndx = usize::from(u16_at(b, 62).ok_or(oob("e_shstrndx"))?);
        let shoff = usize::try_from(shoff).map_err(|_| oob("e_shoff"))?;
        let header = |i: usize| -> Result<(u32, usize, usize), ElfError> {
            let at = shoff
                .checked_add(i.checked_mul(shentsize).ok_or(oob("section header"))?)
                .ok_or(oob("section header"))?;
            let name = u32_at(b, at).ok_or(oob("sh_name"))?;
            let offset = u64_at(b, at.saturating_add(24)).ok_or(oob("sh_offset"))?;
            let size = u64_at(b, at.saturating_add(32)).ok_or(oob("sh_size"))?;
            Ok((
                name,
                usize::try_from(offset).map_err(|_| oob("sh_offset"))?,
                usize::try_from(size).map_err(|_| oob("sh_size"))?,
            ))
        };
        if shnum == 0 {
            return Ok(Vec::new());
        }
        let (_, str_off, str_size) = header(shstrndx)?;
        let strtab = b
            .get(str_off..str_off.checked_add(str_size).ok_or(oob("shstrtab"))?)
            .ok_or(oob("shstrtab"))?;
        let mut out = Vec::with_capacity(shnum);
        for i in 0..shnum {
            let (name_off, offset, size) = header(i)?;
            let name_bytes = strtab.get(name_off as usize..).ok_or(oob("section name"))?;
            let len = name_bytes
                .iter()
                .position(|&c| c == 0)
                .ok_or(oob("section name"))?;
            out.push(Section {
                name: String::from_utf8_lossy(&name_bytes[..len]).into_owned(),
                offset,
                size,
            });
        }
        Ok(out)
    }

    /// The bytes of the first section called `name`.
    pub fn section_bytes(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let Some(s) = self.sections()?.into_iter().find(|s| s.name == name) else {
            return Ok(None);
        };
        let end = s.offset.checked_add(s.size).ok_or(oob("section"))?;
        Ok(Some(self.bytes.get(s.offset..end).ok_or(oob("section"))?))
    }
}

/// The module names a kernel module depends on (its `.modinfo` `depends=` entry).
pub fn module_depends(ko: &[u8]) -> Result<Vec<String>, ElfError> {
    let elf = Elf::parse(ko)?;
    let Some(info) = elf.section_bytes(".modinfo")? else {
        return Ok(Vec::new());
    };
    Ok(info
        .split(|&c| c == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf() {
        assert_eq!(Elf::parse(b"hello").err(), Some(ElfError::NotElf64));
        assert_eq!(Elf::parse(&[]).err(), Some(ElfError::NotElf64));
    }

    #[test]
    fn test_binary_is_readable() {
        // The running test binary is an x86_64 ELF: its headers must parse.
        let exe = std::env::current_exe().expect("current exe");
        let bytes = std::fs::read(exe).expect("read current exe");
        let elf = Elf::parse(&bytes).expect("ELF");
        assert!(!elf.program_headers().expect("phdrs").is_empty());
        assert!(elf
            .sections()
            .expect("sections")
            .iter()
            .any(|s| s.name == ".text"));
        assert!(!elf.has_pvh_note().expect("notes"));
    }

    #[test]
    fn truncated_headers_are_errors_not_panics() {
        let bytes = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        for len in [20, 63, 64, 100, 1000] {
            if let Ok(elf) = Elf::parse(&bytes[..len]) {
                let _ = elf.program_headers();
                let _ = elf.sections();
                let _ = elf.has_pvh_note();
            }
        }
    }
}
