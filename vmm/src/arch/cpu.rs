//! A vCPU's boot state: CPUID (filtered as Firecracker does the essentials), MSRs, registers for
//! the 64-bit entry, FPU, and the local APIC's LINT0/LINT1. The CPUID and register values are
//! computed by pure functions (tested here); `configure_vcpu` only hands them to KVM.
//!
//! On an emulated-KVM host the guest sees the host's CPUID whatever is set here; the filtering
//! matters on hardware hosts, which no machine of this workplace is, so it is checked by these
//! unit tests against what Firecracker and cloud-hypervisor set.

use super::boot::{BOOT_GDT, gdt_entry};
use super::layout::*;
use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};
use kvm_ioctls::VcpuFd;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM refused the vCPU's {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_POWER: u32 = 0x6;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts KVM's supported CPUID for vCPU `index` of `count`: its APIC ID and the processor count in
/// leaf 1, the hypervisor bit, HTT for SMP, x2APIC IDs in the topology leaves, and no power
/// management leaf (the guest cannot use it).
pub fn filter_cpuid(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_POWER => {
                e.eax = 0;
                e.ecx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => e.edx = u32::from(index),
            _ => {}
        }
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The MSRs every vCPU boots with (the set Firecracker and vmm-reference use).
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// General registers for the 64-bit Linux entry: RIP at the kernel's entry, RSI at the zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

fn segment(index: u16, (flags, base, limit): (u16, u32, u32)) -> kvm_segment {
    let entry = gdt_entry(flags, base, limit);
    kvm_segment {
        base: u64::from(base),
        limit: ((entry >> 32) & 0x000f_0000) as u32 | (entry & 0xffff) as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Special registers for long mode with the boot GDT, IDT and page tables.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(1, BOOT_GDT[1]);
    let data = segment(2, BOOT_GDT[2]);
    let tss = segment(3, BOOT_GDT[3]);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// The x87/SSE state at boot.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets LINT0 to ExtINT (the PIC) and LINT1 to NMI in a local APIC register page.
pub fn configure_lints(regs: &mut [std::os::raw::c_char]) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = regs[offset + i] as u8;
        }
        let value = set_delivery_mode(u32::from_le_bytes(bytes), mode);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    }
}

/// Sets up vCPU `index` of `count` for the 64-bit entry at `entry`.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    supported: &CpuId,
    index: u8,
    count: u8,
    entry: u64,
) -> Result<(), CpuError> {
    let mut cpuid = supported.clone();
    filter_cpuid(cpuid.as_mut_slice(), index, count);
    vcpu.set_cpuid2(&cpuid).map_err(kvm("CPUID"))?;
    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    if index == 0 {
        vcpu.set_regs(&boot_regs(entry)).map_err(kvm("registers"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
        vcpu.set_sregs(&boot_sregs(sregs))
            .map_err(kvm("special registers"))?;
    }
    vcpu.set_fpu(&boot_fpu()).map_err(kvm("FPU state"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    configure_lints(&mut lapic.regs);
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_beef,
            eax: 7,
            ecx: 0,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_gets_apic_ids_counts_and_the_hypervisor_bit() {
        let mut entries = vec![
            leaf(1, 0),
            leaf(6, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0x4000_0000, 0),
        ];
        filter_cpuid(&mut entries, 2, 4);
        assert_eq!(entries[0].ebx >> 24, 2, "APIC ID");
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(
            entries[0].ebx & 0xffff,
            0xbeef,
            "CLFLUSH size and brand kept"
        );
        assert_ne!(entries[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(entries[0].edx & EDX_HTT, 0);
        assert_eq!(
            (entries[1].eax, entries[1].ecx),
            (0, 0),
            "no power management"
        );
        assert_eq!(
            (entries[2].edx, entries[3].edx),
            (2, 2),
            "x2APIC ID in every subleaf"
        );
        assert_eq!(entries[4].ebx, 0xdead_beef, "other leaves untouched");
        let mut single = vec![leaf(1, 0)];
        filter_cpuid(&mut single, 0, 1);
        assert_eq!(single[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn boot_msrs_match_firecracker() {
        let msrs = boot_msrs();
        assert!(msrs.contains(&(MSR_IA32_MISC_ENABLE, 1)));
        assert!(msrs.contains(&(MSR_MTRR_DEF_TYPE, (1 << 11) | 6)));
        assert_eq!(msrs.len(), 11);
    }

    #[test]
    fn long_mode_sregs() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(
            (s.cs.selector, s.cs.l, s.cs.type_, s.cs.present),
            (8, 1, 0xb, 1)
        );
        assert_eq!((s.ds.selector, s.ds.db, s.ds.type_), (0x10, 1, 3));
        assert_eq!((s.tr.selector, s.tr.type_), (0x18, 0xb));
        assert_eq!(s.cs.limit, 0xfffff);
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_ADDR, 2));
    }

    #[test]
    fn lints_get_extint_and_nmi() {
        let mut regs = vec![0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x01; // some previous delivery mode bits
        configure_lints(&mut regs);
        let read = |o: usize| {
            u32::from_le_bytes([
                regs[o] as u8,
                regs[o + 1] as u8,
                regs[o + 2] as u8,
                regs[o + 3] as u8,
            ])
        };
        assert_eq!((read(APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((read(APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
