//! construir-vmm: a micro-VMM on the rust-vmm crates that boots construir's guest kernel with a
//! root disk and a job disk, a serial console, an i8042 for the reset that ends the VM, and the
//! status port — nothing else, and never a network device.
//!
//! Layers: `arch` (guest layout and x86 boot state), `devices` (legacy devices and the buses),
//! `virtio` (transport and block device model), `disk` (storage backends), `vm` (wiring and the
//! run loop). See DESIGN.md for the boot order and the threads.

pub mod arch {
    pub mod boot;
    pub mod cpu;
    pub mod layout;
    pub mod mptable;
}
pub mod devices;
pub mod disk;
pub mod faults;
pub mod job;
pub mod sandbox;
pub mod vcpu;
pub mod virtio;
pub mod vm;
