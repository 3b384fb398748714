//! Where things live in the guest: every guest-physical address, I/O port and IRQ the VMM uses.
//! Nothing else in the VMM spells out a guest address.

/// The GDT (4 entries) for 64-bit boot.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel sets its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// The MP floating pointer and table (inside the BIOS data area, where the kernel scans).
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// The zero page (Linux `boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Boot page tables: PML4, PDPT, and one PD mapping the first 1 GiB with 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// The initial stack pointer (grows down, below the zero page's neighbours).
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line.
pub const CMDLINE_MAX: usize = 4096;
/// The end of low memory the kernel may use (EBDA and BIOS area above).
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded if its ELF asks for less.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap below 4 GiB: no RAM there.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// virtio-mmio devices: one 4 KiB slot each from here, IRQs from `VIRTIO_IRQ_BASE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// The TSS and identity map KVM needs on Intel, placed just below the 4 GiB boundary's BIOS area.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The COM1 UART.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 controller: data port 0x60, command/status port 0x64.
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;
/// The status port the guest init writes to (the protocol: `construir_contract::status`).
pub const STATUS_PORT: u16 = construir_contract::status::STATUS_PORT;

/// The MMIO slot of virtio device `n`.
pub fn virtio_mmio_slot(n: u32) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + u64::from(n) * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + n,
    )
}

/// The guest's RAM regions for `mem_bytes` of memory: below the MMIO gap, and the rest above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_mmio_gap() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
        let total: u64 = ram_regions(5 << 30).iter().map(|r| r.1).sum();
        assert_eq!(total, 5 << 30);
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let mut areas = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 8),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX as u64),
            (MPTABLE_ADDR, 0x400),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        const { assert!(BOOT_STACK_ADDR < PML4_ADDR && BOOT_STACK_ADDR > ZERO_PAGE_ADDR + 0x1000) };
        let (addr, irq) = virtio_mmio_slot(1);
        assert_eq!((addr, irq), (0xd000_1000, 6));
        assert!((MMIO_GAP_START..MMIO_GAP_END).contains(&addr));
    }
}
