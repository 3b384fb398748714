//! What the benches share: medians and spreads in milliseconds, and the line that says what
//! host the figures were measured on.

// Each bench uses a part of what is here.
#![allow(dead_code)]

use std::path::Path;

pub mod harness;

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// The `p`-quantile of `v` (sorted in place), NaN when empty.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn spread(v: &mut [f64]) -> String {
    let m = median(v);
    match (v.first().copied(), v.last().copied()) {
        (Some(a), Some(b)) => format!("{} ({}–{})", fmt_ms(m), fmt_ms(a), fmt_ms(b)),
        _ => "–".into(),
    }
}

pub fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// `PATH (FSTYPE)`: the file system a path is on, from /proc/self/mountinfo.
pub fn fs_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (Some(mount), Some(fstype)) = (f.get(4), f.get(sep + 1)) else {
            continue;
        };
        if path.starts_with(mount) && best.as_ref().is_none_or(|b| mount.len() >= b.0) {
            best = Some((mount.len(), fstype.to_string()));
        }
    }
    format!(
        "{} ({})",
        path.display(),
        best.map(|b| b.1).unwrap_or_else(|| "?".into())
    )
}

pub fn host_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let disk = format!("data directories under {}", fs_of(&std::env::temp_dir()));
    format!(
        "host kind **{}**, {cores} cores ({cpu}), {disk}",
        construir_contract::host::detect().as_str()
    )
}
