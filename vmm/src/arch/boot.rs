//! Guest memory and the 64-bit Linux boot: kernel (ELF vmlinux) loading, command line, zero page
//! with the e820 map, boot page tables and GDT. Pure functions over guest memory, tested without KVM.

use super::layout::*;
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{KernelLoader, load_cmdline};
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// Why the guest could not be laid out.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    #[error("cannot open the kernel {path}")]
    KernelOpen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the kernel (an ELF vmlinux is expected)")]
    KernelLoad(#[source] linux_loader::loader::Error),
    #[error("the kernel command line is invalid or too long ({0} bytes, at most {CMDLINE_MAX})")]
    Cmdline(usize),
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the kernel loader thread panicked")]
    LoaderPanicked,
}

fn write<T: ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    value: T,
    addr: u64,
) -> Result<(), BootError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { what, source })
}

/// Allocates guest RAM of `mem_mib` MiB around the MMIO gap.
pub fn create_memory(mem_mib: u64) -> Result<GuestMemoryMmap, BootError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(mem_mib << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    // No transparent huge pages: tried (madvise(MADV_HUGEPAGE)), loading the kernel went from
    // ~10 ms to ~60 ms on this workplace's host (2 MiB zeroing and compaction on fault).
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| BootError::Memory(mem_mib, e))
}

/// Loads an ELF vmlinux; returns its 64-bit entry point.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &std::path::Path,
) -> Result<GuestAddress, BootError> {
    let mut file = std::fs::File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.display().to_string(),
        source,
    })?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::KernelLoad)?;
    // For an ELF vmlinux, kernel_load is the ELF entry point (startup_64's physical address).
    Ok(loaded.kernel_load)
}

/// Writes the command line at `CMDLINE_ADDR`.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::Cmdline(cmdline.len()));
    }
    let mut line = linux_loader::cmdline::Cmdline::new(CMDLINE_MAX)
        .map_err(|_| BootError::Cmdline(cmdline.len()))?;
    line.insert_str(cmdline)
        .map_err(|_| BootError::Cmdline(cmdline.len()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &line)
        .map_err(|_| BootError::Cmdline(cmdline.len()))
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BootParams(boot_params);
// SAFETY: boot_params is a plain-old-data C struct (bindgen, packed integers and arrays only).
unsafe impl ByteValued for BootParams {}

const E820_RAM: u32 = 1;

/// The e820 map for the guest's memory: low RAM up to the EBDA, then RAM from 1 MiB up to the
/// MMIO gap (or the end), and RAM above 4 GiB if there is any.
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    let low_end = mem_bytes.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if mem_bytes > MMIO_GAP_START {
        map.push((MMIO_GAP_END, mem_bytes - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// Writes the zero page: boot protocol header fields, command line pointer, e820 map.
pub fn write_zero_page(mem: &GuestMemoryMmap, cmdline_len: usize) -> Result<(), BootError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    let mem_bytes = mem.iter().map(|r| r.len()).sum();
    let map = e820_map(mem_bytes);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }
    params.e820_entries = map.len() as u8;
    write(mem, "the zero page", BootParams(params), ZERO_PAGE_ADDR)
}

/// Identity-maps the first 1 GiB with 2 MiB pages (enough for the kernel's early boot; it builds
/// its own tables).
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    write(mem, "the PML4", PDPT_ADDR | 0x03, PML4_ADDR)?;
    write(mem, "the PDPT", PD_ADDR | 0x03, PDPT_ADDR)?;
    for i in 0..512u64 {
        write(mem, "the page directory", (i << 21) | 0x83, PD_ADDR + i * 8)?;
    }
    Ok(())
}

/// A GDT entry from flags, base and limit (the x86 encoding).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [(u16, u32, u32); 4] = [
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
];

/// Writes the GDT and an empty IDT.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, (flags, base, limit)) in BOOT_GDT.iter().enumerate() {
        write(
            mem,
            "the GDT",
            gdt_entry(*flags, *base, *limit),
            GDT_ADDR + 8 * i as u64,
        )?;
    }
    write(mem, "the IDT", 0u64, IDT_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_known_encodings() {
        // The values every 64-bit boot VMM uses (Firecracker, vmm-reference).
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = create_memory(64).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pdpt: u64 = mem.read_obj(GuestAddress(PDPT_ADDR)).unwrap();
        assert_eq!(pdpt, PD_ADDR | 3);
        for i in [0u64, 1, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "entry {i}");
        }
    }

    #[test]
    fn e820_leaves_out_the_bios_area_and_the_mmio_gap() {
        assert_eq!(
            e820_map(512 << 20),
            vec![
                (0, EBDA_START, 1),
                (HIMEM_START, (512 << 20) - HIMEM_START, 1)
            ]
        );
        let big = e820_map(4 << 30);
        assert_eq!(big[1], (HIMEM_START, MMIO_GAP_START - HIMEM_START, 1));
        assert_eq!(big[2], (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START, 1));
    }

    #[test]
    fn zero_page_and_cmdline() {
        let mem = create_memory(128).unwrap();
        write_cmdline(&mem, "console=ttyS0 reboot=k").unwrap();
        write_zero_page(&mem, 22).unwrap();
        let params: BootParams = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let p = params.0;
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!(p.e820_entries, 2);
        assert_eq!({ p.e820_table[1].size }, (128 << 20) - HIMEM_START);
        let mut buf = [0u8; 23];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 reboot=k\0");
        assert!(write_cmdline(&mem, &"x".repeat(CMDLINE_MAX)).is_err());
    }

    #[test]
    fn a_non_elf_kernel_is_refused() {
        let mem = create_memory(64).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![0u8; 4096]).unwrap();
        assert!(matches!(
            load_kernel(&mem, f.path()),
            Err(BootError::KernelLoad(_))
        ));
        assert!(matches!(
            load_kernel(&mem, std::path::Path::new("/nonexistent")),
            Err(BootError::KernelOpen { .. })
        ));
    }
}
