//! The Intel MultiProcessor Specification (1.4) table, so a guest without ACPI finds its vCPUs,
//! the I/O APIC and how ISA interrupts are wired. Built as bytes by a pure function.

use super::layout::MPTABLE_ADDR;

/// The I/O APIC's address and the local APIC's.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Interrupt lines wired from the ISA bus to the I/O APIC.
pub const IRQ_LINES: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS: u8 = 0;

/// Why no table was made.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit an MP table (1 to 254)")]
    TooManyCpus(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The MP floating pointer followed by the configuration table, to be written at `MPTABLE_ADDR`.
pub fn mptable(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus; // after the CPUs' APIC IDs
    let table_addr = MPTABLE_ADDR as u32 + 16;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        entries.push(0); // processor
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOT } else { 0 });
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, ISA_BUS]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IRQ_LINES {
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, ISA_BUS, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, ISA_BUS, 0, 0, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, ISA_BUS, 0, 0xff, 1]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(4); // spec 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"CONSTRUI");
    header.extend_from_slice(b"R-VMM       ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 8] {
            let t = mptable(cpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(
                t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)),
                0,
                "floating pointer checksum"
            );
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()),
                MPTABLE_ADDR as u32 + 16
            );
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(
                table.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
                0,
                "table checksum"
            );
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + u16::from(IRQ_LINES) + 2);
            let processors = (0..cpus as usize)
                .filter(|i| table[44 + i * 20] == 0)
                .count();
            assert_eq!(processors, cpus as usize);
            assert_eq!(table[44 + 3] & CPU_BOOT, CPU_BOOT, "CPU 0 boots");
            // The table must end below the EBDA's end (it lives in the last KiB under 640 KiB).
            assert!(
                MPTABLE_ADDR as usize + t.len() <= 0xa0000,
                "{} bytes",
                t.len()
            );
        }
    }

    #[test]
    fn cpu_counts_are_bounded() {
        assert!(mptable(0).is_err());
        assert!(mptable(255).is_err());
    }
}
