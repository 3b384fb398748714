//! Writes to the status port (`construir_contract::status::STATUS_PORT`) with `outb`, after
//! `ioperm()` has granted this process the port. Nothing else in the init touches I/O ports.

use construir_contract::status::STATUS_PORT;
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Asks the kernel for access to the status port. Without it every `send` is a no-op and the
/// host will see a guest that ended without a report (so nothing is ever reported as success).
pub fn enable() {
    // SAFETY: ioperm(2) only changes this process's I/O permission bitmap.
    let rc = unsafe { libc::ioperm(libc::c_ulong::from(STATUS_PORT), 1, 1) };
    if rc == 0 {
        ENABLED.store(true, Ordering::SeqCst);
    } else {
        crate::say!(
            "cannot get access to the status port {STATUS_PORT:#x}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Writes `bytes` to the status port, one `outb` each.
pub fn send(bytes: &[u8]) {
    if !ENABLED.load(Ordering::SeqCst) {
        return;
    }
    for &b in bytes {
        // SAFETY: ioperm() granted this process exactly this port; outb has no memory effects.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") STATUS_PORT, in("al") b, options(nomem, nostack, preserves_flags));
        }
    }
}
