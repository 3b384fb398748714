//! Builds the VM and runs it to the end. The boot order (DESIGN.md): KVM → VM (TSS, identity
//! map, irqchip, PIT) → guest memory → kernel, command line, zero page, page tables, GDT, MP table →
//! legacy devices (serial, i8042, status port) → virtio-blk disks (MMIO slot, irqfd, ioeventfd) →
//! vCPUs (CPUID, MSRs, registers, LAPIC) → vCPU threads → the event loop on this thread (queue
//! notifications, the reset, vCPU stops, the deadline, SIGINT/SIGTERM).

use crate::arch::{boot, cpu, layout, mptable};
use crate::devices::EventTrigger;
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleSink, SerialDevice};
use crate::devices::status::StatusPort;
use crate::disk::DiskBackend;
use crate::sandbox::{self, AllowedFile, Limits, SandboxError, ThreadKind};
use crate::vcpu::{StopReason, StopSignal, describe_internal_error, run_vcpu};
use crate::virtio::Interrupt;
use crate::virtio::block::{Block, DiskStats};
use crate::virtio::mmio::{MmioTransport, reg};
use construir_contract::outcome::RunOutcome;
use construir_contract::status::GuestReport;
use construir_launcher::console::CappedSink;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Set by SIGINT/SIGTERM.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// What the VMM needs to run one guest.
pub struct VmConfig {
    pub kernel: std::path::PathBuf,
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    /// The disks in order (vda, vdb, …): backend, read-only, name for the summary.
    pub disks: Vec<(Box<dyn DiskBackend>, bool, String)>,
    pub console: Box<dyn Write + Send>,
    pub console_cap: u64,
    /// The host's deadline: the VM is stopped past it.
    pub deadline: Duration,
    /// Process start, for the boot-time markers.
    pub process_start: Instant,
    /// The sandbox (`crate::sandbox`), with the files the VMM keeps access to; `None` only for
    /// debugging the VMM itself.
    pub sandbox: Option<Vec<AllowedFile>>,
}

/// Boot-time markers, from process start.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub to_first_kvm_run: Option<Duration>,
    pub to_first_console_byte: Option<Duration>,
    pub to_init: Option<Duration>,
    pub to_exit: Duration,
    /// Where setup's time went, phase by phase, up to the vCPU threads' start.
    pub setup: Vec<(&'static str, Duration)>,
}

/// Durations of consecutive setup phases.
struct Phases {
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new(start: Instant) -> Self {
        Phases {
            last: start,
            done: Vec::new(),
        }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.done.push((phase, now - self.last));
        self.last = now;
    }
}

/// What a run gave.
pub struct RunReport {
    pub outcome: RunOutcome,
    pub timings: Timings,
    pub disks: Vec<(String, Arc<DiskStats>)>,
    pub console_written: u64,
    pub console_dropped: u64,
}

/// Errors setting the VM up (the guest's own failures are outcomes).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks {0}")]
    KvmCapability(&'static str),
    #[error("KVM refused to {what}")]
    KvmSetup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("cannot place a device on the bus")]
    Bus(#[from] crate::devices::bus::BusOverlap),
    #[error("cannot create an event")]
    Event(#[source] std::io::Error),
    #[error("the event loop failed")]
    EventLoop(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmSetup { what, source }
}

/// Opens /dev/kvm and checks what we need.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    for (cap, name) in [
        (kvm_ioctls::Cap::Irqchip, "an in-kernel irqchip"),
        (kvm_ioctls::Cap::Irqfd, "irqfd"),
        (kvm_ioctls::Cap::Ioeventfd, "ioeventfd"),
        (kvm_ioctls::Cap::UserMemory, "user memory"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmCapability(name));
        }
    }
    Ok(kvm)
}

fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("set the TSS address"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("set the identity map"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM (both live until
        // the process ends), and the slots do not overlap.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(kvm_err("map guest memory"))?;
    }
    Ok(vm)
}

/// Watches a block device's queue notifications (ioeventfd).
struct QueueHandler {
    block: Arc<Mutex<Block>>,
    event: EventFd,
}

impl MutEventSubscriber for QueueHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        let run = self.block.lock().expect("block lock").process_queue();
        if run.more {
            // The budget ran out with requests left: come back once the loop has looked at its
            // deadline, the signals and the stop events (and the other disk).
            let _ = self.event.write(1);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            tracing::error!("cannot watch a queue notification: {e:?}");
        }
    }
}

/// Turns an eventfd into a stop reason (the i8042 reset) or just wakes the loop (vCPU stops).
struct StopHandler {
    event: EventFd,
    stop: Arc<StopSignal>,
    reason: Option<StopReason>,
}

impl MutEventSubscriber for StopHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        if let Some(reason) = &self.reason {
            self.stop.stop(reason.clone());
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            tracing::error!("cannot watch the stop event: {e:?}");
        }
    }
}

/// The guest's name for disk `index`, for messages: vda, vdb, …
fn disk_name(index: usize) -> String {
    format!("vd{}", char::from(b'a' + (index % 26) as u8))
}

/// How the event loop ended: a stop a vCPU or device saw, or one the host decided.
type LoopEnd = Result<StopReason, RunOutcome>;

/// Runs the event loop until the VM stops, the signal flag is set or the deadline passes. These
/// are checked between every two rounds of events, and no round is long: a round runs each ready
/// handler once, and the queue handlers return within their budget (`Block::process_queue`),
/// re-arming themselves when work is left, so a guest that keeps its queue full is served between
/// checks, not instead of them. The 100 ms wait bounds how late an idle loop notices.
fn event_loop(
    events: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
    stop: &StopSignal,
    interrupted: &AtomicBool,
    deadline: Instant,
) -> Result<LoopEnd, VmError> {
    loop {
        if let Some(reason) = stop.reason() {
            return Ok(Ok(reason));
        }
        if interrupted.load(Ordering::SeqCst) {
            return Ok(Err(RunOutcome::Interrupted));
        }
        if Instant::now() >= deadline {
            return Ok(Err(RunOutcome::TimedOut { in_guest: false }));
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        events
            .run_with_timeout(wait.as_millis().max(1) as i32)
            .map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
    }
}

/// The `virtio_mmio.device=` parameters for `count` disks.
pub fn virtio_cmdline(count: u32) -> String {
    (0..count)
        .map(|i| {
            let (addr, irq) = layout::virtio_mmio_slot(i);
            format!("virtio_mmio.device=4K@{addr:#x}:{irq}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds the VM, runs it until it ends, and reports.
pub fn run(config: VmConfig) -> Result<RunReport, VmError> {
    let VmConfig {
        kernel,
        cmdline,
        memory_mib,
        vcpus,
        disks,
        console,
        console_cap,
        deadline,
        process_start,
        sandbox: sandbox_files,
    } = config;
    let mut phases = Phases::new(process_start);
    phases.mark("process and arguments");
    let kvm = open_kvm()?;
    let mem = boot::create_memory(memory_mib)?;
    // The two slowest setup steps are independent host work: KVM building the VM (irqchip, PIT,
    // memory slot) and copying the kernel into guest memory (page faults). Side by side they
    // take as long as the longer one.
    let (vm, entry) = std::thread::scope(|scope| {
        let loader = scope.spawn(|| boot::load_kernel(&mem, &kernel));
        let vm = create_vm(&kvm, &mem);
        let entry = loader
            .join()
            .unwrap_or(Err(boot::BootError::LoaderPanicked));
        (vm, entry)
    });
    let (vm, entry) = (vm?, entry?);
    phases.mark("KVM VM and kernel, side by side");

    let full_cmdline = format!("{cmdline} {}", virtio_cmdline(disks.len() as u32));
    boot::write_cmdline(&mem, &full_cmdline)?;
    boot::write_zero_page(&mem, full_cmdline.len())?;
    boot::write_page_tables(&mem)?;
    boot::write_gdt(&mem)?;
    let table = mptable::mptable(vcpus)?;
    vm_memory::Bytes::write_slice(&mem, &table, vm_memory::GuestAddress(layout::MPTABLE_ADDR))
        .map_err(|source| boot::BootError::GuestWrite {
            what: "the MP table",
            source,
        })?;

    phases.mark("boot data");
    let stop = Arc::new(StopSignal::new().map_err(VmError::Event)?);
    let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().map_err(|e| VmError::EventLoop(format!("{e:?}")))?;

    // Legacy devices.
    let mut pio = Bus::new();
    let sink: ConsoleSink = Arc::new(Mutex::new(CappedSink::new(console, console_cap)));
    let serial_irq = EventTrigger::new().map_err(VmError::Event)?;
    vm.register_irqfd(&serial_irq.0, layout::SERIAL_IRQ)
        .map_err(kvm_err("wire the serial IRQ"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, sink.clone())));
    pio.insert(
        serial,
        u64::from(layout::SERIAL_PORT),
        u64::from(layout::SERIAL_PORT_LEN),
    )?;
    let reset = EventTrigger::new().map_err(VmError::Event)?;
    let reset_watch = reset.0.try_clone().map_err(VmError::Event)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(reset))),
        u64::from(layout::I8042_PORT),
        u64::from(layout::I8042_PORT_LEN),
    )?;
    let status = Arc::new(Mutex::new(StatusPort::default()));
    pio.insert(
        status.clone() as Arc<Mutex<dyn BusDevice>>,
        u64::from(layout::STATUS_PORT),
        1,
    )?;
    events.add_subscriber(Box::new(StopHandler {
        event: reset_watch,
        stop: stop.clone(),
        reason: Some(StopReason::GuestEnded(
            "the guest reset through the i8042 (reboot)".into(),
        )),
    }));
    events.add_subscriber(Box::new(StopHandler {
        event: stop.event.try_clone().map_err(VmError::Event)?,
        stop: stop.clone(),
        reason: None,
    }));

    // virtio-blk disks.
    let largest_disk = disks.iter().map(|(d, _, _)| d.size()).max().unwrap_or(0);
    let mut mmio = Bus::new();
    let mut disk_stats = Vec::new();
    // Each disk's guest faults, as the device and its transport counted them.
    let mut fault_logs = Vec::new();
    for (i, (backend, read_only, name)) in disks.into_iter().enumerate() {
        let (addr, irq) = layout::virtio_mmio_slot(i as u32);
        let mut block = Block::new(backend, read_only);
        let interrupt = Interrupt::new().map_err(VmError::Event)?;
        vm.register_irqfd(&interrupt.irq, irq)
            .map_err(kvm_err("wire a virtio IRQ"))?;
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Event)?;
        vm.register_ioevent(
            &notify,
            &IoEventAddress::Mmio(addr + reg::QUEUE_NOTIFY),
            NoDatamatch,
        )
        .map_err(kvm_err("register a queue notification"))?;
        block.set_notify_event(notify.try_clone().map_err(VmError::Event)?);
        let stats = block.stats.clone();
        disk_stats.push((name, stats.clone()));
        let block = Arc::new(Mutex::new(block));
        events.add_subscriber(Box::new(QueueHandler {
            block: block.clone(),
            event: notify,
        }));
        let transport = MmioTransport::new(block, mem.clone(), interrupt);
        fault_logs.push((disk_name(i), stats, transport.faults()));
        mmio.insert(
            Arc::new(Mutex::new(transport)),
            addr,
            layout::VIRTIO_MMIO_SIZE,
        )?;
    }

    phases.mark("devices");
    // vCPUs.
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report its CPUID"))?;
    let first_run = Arc::new(Mutex::new(None));
    let mut vcpu_fds = Vec::new();
    for index in 0..vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("create a vCPU"))?;
        cpu::configure_vcpu(&vcpu, &supported, index, vcpus, entry.0)?;
        vcpu_fds.push(vcpu);
    }

    // Everything is open and mapped: confine the process before the guest runs a single
    // instruction. Limits and landlock here (inherited by the vCPU threads), each vCPU thread
    // installs its filter before its first KVM_RUN, this thread after starting them.
    let filters = match &sandbox_files {
        Some(files) => Some(sandbox::confine_process(
            files,
            &Limits::for_vm(memory_mib << 20, largest_disk, console_cap),
        )?),
        None => {
            tracing::warn!(
                "the sandbox is off (--no-sandbox): never run strangers' jobs like this"
            );
            None
        }
    };

    phases.mark("vCPUs and sandbox");
    let mut threads = Vec::new();
    for (index, vcpu) in vcpu_fds.into_iter().enumerate() {
        let (pio, mmio, mem, stop) = (pio.clone(), mmio.clone(), mem.clone(), stop.clone());
        let first = (index == 0).then(|| first_run.clone());
        let filter = filters.as_ref().map(|f| f.vcpu.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    if let Some(filter) = filter
                        && let Err(e) = sandbox::install(ThreadKind::Vcpu, &filter)
                    {
                        stop.stop(StopReason::Error(e.to_string()));
                        return;
                    }
                    run_vcpu(vcpu, pio, mmio, mem, stop, first)
                })
                .map_err(VmError::Event)?,
        );
    }
    if let Some(filters) = &filters {
        sandbox::install(ThreadKind::Vmm, &filters.vmm)?;
    }

    // The event loop.
    let now = Instant::now();
    // A deadline past what Instant can hold (a --timeout of centuries) is as good as none.
    let deadline = now
        .checked_add(deadline)
        .unwrap_or(now + Duration::from_secs(u64::from(u32::MAX)));
    let host_stop = event_loop(&mut events, &stop, &INTERRUPTED, deadline)?;
    // vCPU threads end at their next exit; the process exits after the report, so they are not
    // joined (a vCPU may be inside a long emulated KVM_RUN).
    drop(threads);
    // What the guest got wrong beyond the few lines logged at the time: a bounded report.
    for (name, stats, transport) in &fault_logs {
        stats.faults.report(name);
        transport.report(&format!("{name} (virtio-mmio)"));
    }
    crate::devices::LEGACY_FAULTS.report("serial/i8042");

    let status = status.lock().expect("status lock");
    let outcome = match host_stop {
        Err(outcome) => outcome,
        Ok(StopReason::GuestEnded(how)) => RunOutcome::from_report(status.outcome(), &how),
        Ok(StopReason::InternalError {
            suberror,
            rip,
            bytes,
        }) => {
            let msg = describe_internal_error(suberror, rip, &bytes);
            tracing::error!("{msg}");
            match status.outcome() {
                // The job had already reported: a failure during the reboot does not change it.
                Some(report @ GuestReport::Exited(_)) => RunOutcome::from_report(Some(report), ""),
                _ => RunOutcome::GuestFailed(msg),
            }
        }
        Ok(StopReason::FailEntry(reason)) => RunOutcome::GuestFailed(format!(
            "KVM could not enter the guest (hardware entry failure {reason:#x})"
        )),
        Ok(StopReason::Error(msg)) => RunOutcome::GuestFailed(msg),
    };
    let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(process_start));
    let sink = sink.lock().expect("console lock");
    let timings = Timings {
        to_first_kvm_run: since(*first_run.lock().expect("timing lock")),
        to_first_console_byte: since(sink.first_byte()),
        to_init: since(status.first_write()),
        to_exit: process_start.elapsed(),
        setup: phases.done,
    };
    Ok(RunReport {
        outcome,
        timings,
        disks: disk_stats,
        console_written: sink.written(),
        console_dropped: sink.dropped(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::virtio::VirtioDevice;
    use crate::virtio::testing::{FloodDisk, Ring};
    use std::sync::atomic::AtomicU64;
    use vm_memory::{Bytes, GuestAddress};

    /// An event loop with one disk whose guest refills the queue with every request served
    /// (`FloodDisk`), plus the vCPU stop event; returns the loop, the stop signal and the reads.
    fn flooded_event_loop() -> (
        EventManager<Box<dyn MutEventSubscriber + Send>>,
        Arc<StopSignal>,
        Arc<AtomicU64>,
    ) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ring = Ring::new(&mem, 16);
        // One 512-byte read at descriptor 0, offered in every slot.
        mem.write_obj(
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN,
            GuestAddress(0x1_0000),
        )
        .unwrap();
        mem.write_obj(0u64, GuestAddress(0x1_0008)).unwrap();
        ring.set_desc(0, 0x1_0000, 16, false, Some(1));
        ring.set_desc(1, 0x2_0000, 512, true, Some(2));
        ring.set_desc(2, 0x3_0000, 1, true, None);
        ring.fill_avail_slots(0);
        ring.make_available(0);
        let reads = Arc::new(AtomicU64::new(0));
        let disk = FloodDisk {
            mem: mem.clone(),
            // Enough for a minute or more of work before the fix.
            left: Arc::new(AtomicU64::new(5_000_000)),
            reads: reads.clone(),
        };
        let mut block = Block::new(Box::new(disk), false);
        block
            .activate(mem, vec![ring.queue()], Interrupt::new().unwrap())
            .unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        notify.write(1).unwrap();
        let stop = Arc::new(StopSignal::new().unwrap());
        let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().unwrap();
        events.add_subscriber(Box::new(QueueHandler {
            block: Arc::new(Mutex::new(block)),
            event: notify,
        }));
        events.add_subscriber(Box::new(StopHandler {
            event: stop.event.try_clone().unwrap(),
            stop: stop.clone(),
            reason: None,
        }));
        (events, stop, reads)
    }

    #[test]
    fn the_deadline_ends_the_event_loop_while_the_guest_floods_its_queue() {
        let (mut events, stop, reads) = flooded_event_loop();
        let start = Instant::now();
        let end = event_loop(
            &mut events,
            &stop,
            &AtomicBool::new(false),
            start + Duration::from_millis(300),
        )
        .unwrap();
        let took = start.elapsed();
        assert!(
            matches!(end, Err(RunOutcome::TimedOut { in_guest: false })),
            "{end:?}"
        );
        // Before the budget the first queue event never returned while the guest kept feeding:
        // the loop ran until the feeding stopped (5,000,000 requests here).
        assert!(took < Duration::from_secs(5), "the loop took {took:?}");
        assert!(
            reads.load(Ordering::Relaxed) > 256,
            "the queue was served between the checks, more than one budget's worth"
        );
    }

    #[test]
    fn signals_and_stops_end_the_event_loop_while_the_guest_floods_its_queue() {
        let (mut events, stop, _) = flooded_event_loop();
        let far = Instant::now() + Duration::from_secs(3600);
        let start = Instant::now();
        let flag = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                flag.store(true, Ordering::SeqCst);
            });
            let end = event_loop(&mut events, &stop, &flag, far).unwrap();
            assert!(matches!(end, Err(RunOutcome::Interrupted)), "{end:?}");
        });
        assert!(start.elapsed() < Duration::from_secs(5));

        let (mut events, stop, _) = flooded_event_loop();
        let stopper = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            stopper.stop(StopReason::GuestEnded("reset".into()));
        });
        let end = event_loop(&mut events, &stop, &AtomicBool::new(false), far).unwrap();
        t.join().unwrap();
        assert_eq!(end, Ok(StopReason::GuestEnded("reset".into())));
    }

    #[test]
    fn virtio_devices_are_announced_on_the_command_line() {
        assert_eq!(
            virtio_cmdline(2),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
