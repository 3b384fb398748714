//! The archive readers: formats, damage, and what a hostile archive may cost.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn tar_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_cksum();
        builder.append_data(&mut header, path, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn compress(tar: &[u8], how: Compression) -> Vec<u8> {
    match how {
        Compression::Xz => {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => {
            let mut out = Vec::new();
            ruzstd::encoding::compress(tar, &mut out, ruzstd::encoding::CompressionLevel::Fastest);
            out
        }
        Compression::None => tar.to_vec(),
    }
}

const SCRIPT: &[u8] = b"#!/bin/sh\necho hi\n";

#[test]
fn every_compression_unpacks_with_trailing_padding_and_stale_data() {
    let tar = tar_of(&[
        ("./opt/job/construir", SCRIPT, 0o755),
        ("opt/job/data", b"12345", 0o644),
    ]);
    for how in [
        Compression::Xz,
        Compression::Gzip,
        Compression::Zstd,
        Compression::None,
    ] {
        let mut disk = compress(&tar, how);
        disk.extend(std::iter::repeat_n(0u8, 4096));
        disk.extend(compress(&tar_of(&[("stale", b"old", 0o644)]), how));
        disk.extend(std::iter::repeat_n(0xa5u8, 1000));
        let dir = tempfile::tempdir().unwrap();
        let summary = unpack(&disk[..], dir.path()).unwrap();
        assert_eq!(summary.entries, 2, "{how:?}");
        assert_eq!(summary.compression, Some(how.as_str()));
        let script = dir.path().join(JOB_SCRIPT);
        assert_eq!(std::fs::read(&script).unwrap(), SCRIPT);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            !dir.path().join("stale").exists(),
            "{how:?} read past the first archive"
        );
        assert_eq!(
            read_file(&disk[..], "opt/job/data", 100).unwrap().unwrap(),
            b"12345"
        );
        assert_eq!(read_file(&disk[..], "missing", 100).unwrap(), None);
        let (c, entries) = list(&disk[..]).unwrap();
        assert_eq!(c, how);
        assert_eq!(entries[0].path, JOB_SCRIPT);
        assert_eq!(entries[0].mode, 0o755);
    }
}

#[test]
fn garbage_and_zeros_are_not_archives() {
    let dir = tempfile::tempdir().unwrap();
    for junk in [
        vec![0u8; 4096],
        vec![],
        b"hello world, this is not a tar".to_vec(),
    ] {
        assert!(matches!(
            unpack(&junk[..], dir.path()),
            Err(ArchiveError::NotAnArchive)
        ));
    }
}

#[test]
fn truncated_and_damaged_archives_are_corrupt() {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let tar = tar_of(&[("opt/job/construir", SCRIPT, 0o755), ("big", &data, 0o644)]);
    for how in [Compression::Xz, Compression::Gzip, Compression::Zstd] {
        let full = compress(&tar, how);
        let dir = tempfile::tempdir().unwrap();
        let cut = &full[..full.len() / 2];
        assert!(
            matches!(unpack(cut, dir.path()), Err(ArchiveError::Corrupt { .. })),
            "{how:?} cut"
        );
        let mut damaged = full.clone();
        let mid = damaged.len() / 2;
        for b in &mut damaged[mid..mid + 64] {
            *b ^= 0x5a;
        }
        assert!(unpack(&damaged[..], dir.path()).is_err(), "{how:?} damaged");
    }
}

#[test]
fn read_file_enforces_its_limit() {
    let tar = tar_of(&[("out.bin", &[7u8; 1000], 0o644)]);
    assert!(matches!(
        read_file(&tar[..], "./out.bin", 999),
        Err(ArchiveError::TooLarge { .. })
    ));
    assert_eq!(
        read_file(&tar[..], "/out.bin", 1000)
            .unwrap()
            .unwrap()
            .len(),
        1000
    );
}

#[test]
fn paths_cannot_escape_the_destination() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o644);
    // Bypass the builder's own path checks to forge a hostile name.
    header.as_old_mut().name[..13].copy_from_slice(b"../escaped.tx");
    header.set_cksum();
    builder.append(&header, &b"bad"[..]).unwrap();
    let tar = builder.into_inner().unwrap();
    let outer = tempfile::tempdir().unwrap();
    let dest = outer.path().join("root");
    std::fs::create_dir(&dest).unwrap();
    let _ = unpack(&tar[..], &dest);
    assert!(!outer.path().join("escaped.tx").exists());
}

/// Counts the bytes live on each thread, to show a hostile archive cannot make a reader allocate
/// much. Per thread, so tests running beside each other do not disturb it.
mod peak {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn add(delta: isize) {
        // Const-initialised Cells have no destructor: touching them never allocates.
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    struct Counting;

    // SAFETY: every call is forwarded to the system allocator unchanged; counting touches only
    // thread-local Cells.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller upholds `alloc`'s contract, which is System's.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                add(layout.size() as isize);
            }
            p
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: as for `alloc`.
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                add(layout.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from this allocator, i.e. from System, with `layout`.
            unsafe { System.dealloc(ptr, layout) };
            add(-(layout.size() as isize));
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: `ptr` came from System with `layout`; the caller upholds the rest.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                add(new_size as isize - layout.size() as isize);
            }
            p
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Runs `f`; returns its result and the most bytes live on this thread meanwhile, above
    /// what was live when it started.
    pub fn during<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let start = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(start));
        let out = f();
        (out, (PEAK.with(Cell::get) - start).max(0) as usize)
    }
}

/// A GNU header block of `kind` for `name`, claiming `size` bytes of data.
fn header_block(kind: tar::EntryType, name: &str, size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_path(name).unwrap();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    header.as_bytes().to_vec()
}

/// A stream that starts with `head` and goes on with zeros for `zeros` bytes: a huge entry
/// without holding it in memory.
fn then_zeros(head: Vec<u8>, zeros: u64) -> impl Read {
    Cursor::new(head).chain(io::repeat(0).take(zeros))
}

/// A PAX extended-header record, `LEN key=value\n`, whose length counts itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while format!("{len}").len() + rest > len {
        len += 1;
    }
    format!("{len} {key}={value}\n").into_bytes()
}

fn assert_metadata_too_large<T: std::fmt::Debug>(what: &str, result: Result<T, ArchiveError>) {
    match result {
        Err(ArchiveError::MetadataTooLarge { limit }) => {
            assert_eq!(limit, Limits::DEFAULT.max_metadata, "{what}")
        }
        other => panic!("{what}: {other:?}"),
    }
}

#[test]
fn a_huge_gnu_long_name_or_pax_header_fails_in_bounded_memory() {
    // What the old reader did with a 1.2 MiB gzip: read the whole long name into memory.
    const HUGE: u64 = 256 << 20;
    const BOUND: usize = 4 << 20;
    for kind in [
        tar::EntryType::GNULongName,
        tar::EntryType::GNULongLink,
        tar::EntryType::XHeader,
    ] {
        let head = || header_block(kind, "././@LongLink", HUGE);
        let (r, peak) = peak::during(|| list(then_zeros(head(), HUGE)));
        assert_metadata_too_large("list", r);
        assert!(peak < BOUND, "{kind:?}: list allocated {peak} bytes");
        let (r, peak) = peak::during(|| read_file(then_zeros(head(), HUGE), "x", 1024));
        assert_metadata_too_large("read_file", r);
        assert!(peak < BOUND, "{kind:?}: read_file allocated {peak} bytes");
        let dir = tempfile::tempdir().unwrap();
        let (r, peak) =
            peak::during(|| extract(then_zeros(head(), HUGE), dir.path(), &Limits::DEFAULT));
        assert_metadata_too_large("extract", r);
        assert!(peak < BOUND, "{kind:?}: extract allocated {peak} bytes");
    }

    // The same as a real gzip job output (compressed ~1000:1).
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&header_block(
        tar::EntryType::GNULongName,
        "././@LongLink",
        16 << 20,
    ))
    .unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..16 {
        gz.write_all(&zeros).unwrap();
    }
    let disk = gz.finish().unwrap();
    let (r, peak) = peak::during(|| list(&disk[..]));
    assert_metadata_too_large("gzip list", r);
    assert!(peak < BOUND, "gzip list allocated {peak} bytes");
}

/// A path of `n` directories, each 99 bytes long (the file system allows 255 per component).
fn deep(n: usize, leaf: &str) -> String {
    let dir = "d".repeat(99);
    format!("{}{leaf}", format!("{dir}/").repeat(n))
}

#[test]
fn long_names_and_pax_paths_within_the_limit_still_read() {
    let long = deep(10, "out.txt");
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(2);
    header.set_mode(0o644);
    builder.append_data(&mut header, &long, &b"hi"[..]).unwrap();
    let mut tar = builder.into_inner().unwrap();
    // Drop the end-of-archive blocks, add a PAX-named entry.
    tar.truncate(tar.len() - 1024);
    let pax_path = deep(30, "pax.txt");
    let pax = pax_record("path", &pax_path);
    let mut x = tar::Header::new_ustar();
    x.set_entry_type(tar::EntryType::XHeader);
    x.set_path("PaxHeader").unwrap();
    x.set_size(pax.len() as u64);
    x.set_cksum();
    tar.extend_from_slice(x.as_bytes());
    tar.extend_from_slice(&pax);
    tar.resize(tar.len().next_multiple_of(512), 0);
    tar.extend(header_block(tar::EntryType::Regular, "short", 3));
    tar.extend_from_slice(b"pax");
    tar.resize(tar.len().next_multiple_of(512) + 1024, 0);

    let (_, entries) = list(&tar[..]).unwrap();
    let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, [&long, &pax_path]);
    assert_eq!(read_file(&tar[..], &long, 10).unwrap().unwrap(), b"hi");
    let dir = tempfile::tempdir().unwrap();
    extract(&tar[..], dir.path(), &Limits::DEFAULT).unwrap();
    assert_eq!(std::fs::read(dir.path().join(&long)).unwrap(), b"hi");
    assert_eq!(std::fs::read(dir.path().join(&pax_path)).unwrap(), b"pax");

    // A name just under the limit still lists.
    let near = "n".repeat(60_000);
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    builder
        .append_data(&mut header, &near, io::empty())
        .unwrap();
    let (_, entries) = list(&builder.into_inner().unwrap()[..]).unwrap();
    assert_eq!(entries[0].path, near);
}

#[test]
fn extracting_a_bomb_stops_at_the_output_limit() {
    let chunk = vec![0u8; 600 << 10];
    let tar = tar_of(&[
        ("a", &chunk, 0o644),
        ("b", &chunk, 0o644),
        ("c", &chunk, 0o644),
    ]);
    let disk = compress(&tar, Compression::Zstd);
    assert!(disk.len() < 64 << 10, "a bomb: {} bytes", disk.len());
    let limits = Limits {
        max_output: 1 << 20,
        ..Limits::DEFAULT
    };
    let dir = tempfile::tempdir().unwrap();
    match extract(&disk[..], dir.path(), &limits) {
        Err(ArchiveError::OutputTooLarge { path, limit }) => {
            assert_eq!((path.as_str(), limit), ("b", 1 << 20))
        }
        other => panic!("{other:?}"),
    }
    let written: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(written, 600 << 10, "nothing past the limit is written");
    assert!(!dir.path().join("b").exists());
    // Exactly the limit is fine.
    let limits = Limits {
        max_output: 3 * (600 << 10),
        ..Limits::DEFAULT
    };
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(extract(&disk[..], dir.path(), &limits).unwrap().entries, 3);
}

#[test]
fn the_stream_budget_stops_every_reader() {
    let data = vec![0u8; 1 << 20];
    let tar = tar_of(&[("big", &data, 0o644), ("after", b"x", 0o644)]);
    let disk = compress(&tar, Compression::Xz);
    let small = Limits {
        max_stream: 512 << 10,
        ..Limits::DEFAULT
    };
    let stream_error = |r: Result<_, ArchiveError>| match r {
        Err(ArchiveError::StreamTooLarge { limit }) => assert_eq!(limit, 512 << 10),
        other => panic!("{other:?}"),
    };
    stream_error(list_each(&disk[..], &small, |_| {}).map(|_| ()));
    stream_error(copy_file(&disk[..], "after", 10, &small, &mut Vec::new()).map(|_| ()));
    stream_error(copy_file(&disk[..], "big", 2 << 20, &small, &mut Vec::new()).map(|_| ()));
    let dir = tempfile::tempdir().unwrap();
    stream_error(extract(&disk[..], dir.path(), &small).map(|_| ()));
    // A budget the whole stream fits in, to its last block, is enough.
    let exact = Limits {
        max_stream: tar.len() as u64,
        ..Limits::DEFAULT
    };
    assert_eq!(list_each(&disk[..], &exact, |_| {}).unwrap().entries, 2);
}

#[test]
fn too_many_entries_are_refused() {
    let files: Vec<(String, &[u8], u32)> = (0..10)
        .map(|i| (format!("f{i}"), &b"x"[..], 0o644))
        .collect();
    let files: Vec<(&str, &[u8], u32)> = files.iter().map(|(p, d, m)| (&p[..], *d, *m)).collect();
    let tar = tar_of(&files);
    let five = Limits {
        max_entries: 5,
        ..Limits::DEFAULT
    };
    assert!(matches!(
        list_each(&tar[..], &five, |_| {}),
        Err(ArchiveError::TooManyEntries { limit: 5 })
    ));
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        extract(&tar[..], dir.path(), &five),
        Err(ArchiveError::TooManyEntries { limit: 5 })
    ));
    let ten = Limits {
        max_entries: 10,
        ..Limits::DEFAULT
    };
    assert_eq!(list_each(&tar[..], &ten, |_| {}).unwrap().entries, 10);
}

#[test]
fn copy_file_refuses_an_oversized_file_before_writing() {
    let tar = tar_of(&[("out.bin", &[7u8; 1000], 0o644)]);
    let mut out = Vec::new();
    assert!(matches!(
        copy_file(&tar[..], "out.bin", 999, &Limits::DEFAULT, &mut out),
        Err(ArchiveError::TooLarge { limit: 999, .. })
    ));
    assert!(out.is_empty());
    assert_eq!(
        copy_file(&tar[..], "out.bin", 1000, &Limits::DEFAULT, &mut out).unwrap(),
        Some(1000)
    );
    assert_eq!(out, [7u8; 1000]);
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn extract_drops_special_bits_and_applies_the_umask() {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, mode) in [
        ("setuid", 0o4755),
        ("setgid", 0o2755),
        ("sticky", 0o1777),
        ("shared", 0o666),
        ("open", 0o777),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_mode(mode);
        builder.append_data(&mut header, name, &b"x"[..]).unwrap();
    }
    for (name, mode) in [("tmpdir/", 0o1777), ("sgid-dir/", 0o2775)] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        header.set_mode(mode);
        builder.append_data(&mut header, name, io::empty()).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let expect = [
        ("setuid", 0o755),
        ("setgid", 0o755),
        ("sticky", 0o777),
        ("shared", 0o666),
        ("open", 0o777),
        ("tmpdir", 0o777),
        ("sgid-dir", 0o775),
    ];
    for mask in [0o022, 0o077, 0o002] {
        let dir = tempfile::tempdir().unwrap();
        unpack_with(&tar[..], dir.path(), &Limits::DEFAULT, Modes::Mask(mask)).unwrap();
        for (name, mode) in expect {
            assert_eq!(
                mode_of(&dir.path().join(name)),
                mode & !mask,
                "{name} with umask {mask:o}"
            );
        }
    }
    // The public entry point takes this process's umask.
    let mask = umask();
    let dir = tempfile::tempdir().unwrap();
    extract(&tar[..], dir.path(), &Limits::DEFAULT).unwrap();
    for (name, mode) in expect {
        assert_eq!(mode_of(&dir.path().join(name)), mode & !mask, "{name}");
    }
    // The guest's unpack of its own job keeps every bit.
    let dir = tempfile::tempdir().unwrap();
    unpack(&tar[..], dir.path()).unwrap();
    assert_eq!(mode_of(&dir.path().join("setuid")), 0o4755);
    assert_eq!(mode_of(&dir.path().join("shared")), 0o666);
}

#[test]
fn the_umask_reads_from_proc() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    assert_eq!(format!("Umask:\t{:04o}", umask()), line);
}

/// A base-256 numeric field: tar reads it for any size, where octal stops at 8 GiB.
fn num12(v: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0] = 0x80;
    out[4..].copy_from_slice(&v.to_be_bytes());
    out
}

/// A GNU sparse entry: `blocks` of (offset, data), unpacked size `real`.
fn sparse_entry(name: &str, blocks: &[(u64, &[u8])], real: u64) -> Vec<u8> {
    assert!(blocks.len() <= 4 && blocks.iter().all(|(_, d)| d.len() % 512 == 0));
    let stored: usize = blocks.iter().map(|(_, d)| d.len()).sum();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_path(name).unwrap();
    header.set_mode(0o644);
    header.set_size(stored as u64);
    let gnu = header.as_gnu_mut().unwrap();
    for (slot, (offset, data)) in gnu.sparse.iter_mut().zip(blocks) {
        slot.offset = num12(*offset);
        slot.numbytes = num12(data.len() as u64);
    }
    gnu.realsize = num12(real);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    for (_, data) in blocks {
        out.extend_from_slice(data);
    }
    out
}

#[test]
fn a_sparse_file_keeps_the_framing_and_its_hole_buys_no_metadata() {
    let (a, b) = ([b'a'; 512], [b'b'; 512]);
    // A small sparse file, then a plain one: both read, both unpack.
    let mut tar = sparse_entry("holes", &[(0, &a), (1 << 20, &b)], (1 << 20) + 512);
    tar.extend(tar_of(&[("after", b"ok", 0o644)]));
    let (_, entries) = list(&tar[..]).unwrap();
    let got: Vec<_> = entries.iter().map(|e| (e.path.as_str(), e.size)).collect();
    assert_eq!(got, [("holes", (1 << 20) + 512), ("after", 2)]);
    let dir = tempfile::tempdir().unwrap();
    extract(&tar[..], dir.path(), &Limits::DEFAULT).unwrap();
    let holes = std::fs::read(dir.path().join("holes")).unwrap();
    assert_eq!((&holes[..512], &holes[1 << 20..]), (&a[..], &b[..]));
    assert_eq!(std::fs::read(dir.path().join("after")).unwrap(), b"ok");

    // A terabyte hole, then a huge long name: the hole is not data the next header may use.
    let head = [
        sparse_entry("hole", &[(0, &a), ((1 << 40) - 512, &b)], 1 << 40),
        header_block(tar::EntryType::GNULongName, "././@LongLink", 256 << 20),
    ]
    .concat();
    let (r, peak) = peak::during(|| list(then_zeros(head.clone(), 256 << 20)));
    assert_metadata_too_large("list after a hole", r);
    assert!(peak < 4 << 20, "allocated {peak} bytes");
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        extract(then_zeros(head, 256 << 20), dir.path(), &Limits::DEFAULT),
        Err(ArchiveError::OutputTooLarge { .. })
    ));
}

#[test]
fn an_xz_header_asking_for_a_huge_dictionary_is_refused_not_allocated() {
    // The LZMA2 properties byte in the block header names the dictionary size; 40 is 4 GiB - 1.
    let tar = tar_of(&[("out.txt", b"hello".as_slice(), 0o644)]);
    let mut xz = compress(&tar, Compression::Xz);
    let header_start = 12;
    let header_len = (usize::from(xz[header_start]) + 1) * 4;
    let header = header_start..header_start + header_len - 4;
    let at = xz[header.clone()]
        .windows(2)
        .position(|w| w == [0x21, 0x01])
        .expect("an LZMA2 filter in the block header")
        + header_start
        + 2;
    xz[at] = 40;
    let mut crc = flate2::Crc::new();
    crc.update(&xz[header.clone()]);
    xz[header.end..header.end + 4].copy_from_slice(&crc.sum().to_le_bytes());
    let e = list(&xz[..]).unwrap_err();
    assert!(
        matches!(
            e,
            ArchiveError::Corrupt {
                compression: "xz",
                ..
            }
        ),
        "{e}"
    );
    let source = std::error::Error::source(&e).unwrap().to_string();
    assert!(source.contains("limit"), "{source}");
}
