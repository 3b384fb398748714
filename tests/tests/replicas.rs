//! Replicas end to end: construir-server, two pull runners of two owners (real VMs, QEMU's TCG,
//! image t0) and the client binary. `construir submit --replicas 2 --wait` ends verified: both
//! runners' outputs have one tree, bit for bit in every file (a plain tar's times may differ
//! between the archives, which the tree digest and the receipt leave out). `construir fetch` brings the result and its
//! receipt, and `construir verify` accepts it offline with the server's key, and refuses a
//! changed byte of the output or of the receipt, saying which.

mod support;

use construir_tests::TestJob;
use std::path::Path;
use support::Farm;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Two pull runners of two owners (bob's and carol's) against the farm's server.
fn two_owners_runners(farm: &Farm) -> [support::Proc; 2] {
    let carol = farm.runner_token_of("carol");
    [
        farm.runner("bob-1", &farm.server.url, &[]),
        farm.runner_with(&carol, "carol-1", &farm.server.url, &[]),
    ]
}

/// `construir submit JOB --replicas 2 --wait` (256 MiB, 1 vCPU, 5 min, `output_size`), which
/// must exit 0: the job's id and its view once it ended.
fn submit_twice(farm: &Farm, job: &Path, output_size: &str) -> (u64, serde_json::Value) {
    let out = farm.client(&[
        "submit",
        job.to_str().unwrap(),
        "--replicas",
        "2",
        "--wait",
        "--memory",
        "256M",
        "--vcpus",
        "1",
        "--timeout",
        "5m",
        "--output-size",
        output_size,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id: u64 = text(&out.stdout).trim().parse().expect("the job's id");
    (id, farm.show_json(id))
}

#[test]
fn two_owners_runners_agree_and_the_fetched_result_verifies_offline() {
    let farm = Farm::start(&[]);
    let _runners = two_owners_runners(&farm);
    let (job, data) = support::echo_job("twice", 200_000, 11, 0);
    let (id, view) = submit_twice(&farm, &job.path, "16M");
    assert_eq!(view["state"], "succeeded", "{view:#}");
    assert_eq!(view["attestation"], "verified", "{view:#}");
    let agreeing: Vec<u64> = view["agreeing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_u64().unwrap())
        .collect();
    assert_eq!(agreeing.len(), 2);
    let attempts = view["attempts"].as_array().unwrap();
    let of = |id: u64| attempts.iter().find(|a| a["id"] == id).unwrap();
    let (a, b) = (of(agreeing[0]), of(agreeing[1]));
    assert_ne!(a["runner_owner"], b["runner_owner"], "two owners");
    assert_eq!(
        a["output_index"]["tree_sha256"], b["output_index"]["tree_sha256"],
        "one tree on both runners"
    );
    assert!(a["signed"] == true && b["signed"] == true);
    farm.check_output(id, &view, &data);

    // Fetched with its receipt, and checked offline against the key got from the server.
    let dir = farm.root.join("fetched");
    let out = farm.client(&["fetch", &id.to_string(), "-o", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for f in ["receipt.json", "output.archive", "record.json"] {
        assert!(dir.join(f).is_file(), "fetch wrote {f}");
    }
    let (key, _) = farm.get("/.well-known/construir/server-key");
    let key_file = farm.root.join("server-key.json");
    std::fs::write(&key_file, &key).unwrap();
    let verify = |dir: &std::path::Path| {
        farm.client(&[
            "verify",
            dir.to_str().unwrap(),
            "--server-key",
            key_file.to_str().unwrap(),
        ])
    };
    let ok = verify(&dir);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert!(
        text(&ok.stdout).contains("verified"),
        "{}",
        text(&ok.stdout)
    );

    // One byte of the output changed.
    let archive = dir.join("output.archive");
    let good = std::fs::read(&archive).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    std::fs::write(&archive, &bad).unwrap();
    let refused = verify(&dir);
    assert_eq!(
        refused.status.code(),
        Some(116),
        "{}",
        text(&refused.stderr)
    );
    assert!(
        text(&refused.stderr).contains("output.archive"),
        "{}",
        text(&refused.stderr)
    );
    std::fs::write(&archive, &good).unwrap();

    // One byte of the receipt changed (its issue time: still valid JSON, no longer signed).
    let receipt = dir.join("receipt.json");
    let text_of = std::fs::read_to_string(&receipt).unwrap();
    let changed = text_of.replacen("issued_ms\\\":1", "issued_ms\\\":2", 1);
    assert_ne!(
        changed, text_of,
        "the receipt names its issue time: {text_of}"
    );
    std::fs::write(&receipt, changed).unwrap();
    let refused = verify(&dir);
    assert_eq!(
        refused.status.code(),
        Some(116),
        "{}",
        text(&refused.stderr)
    );
    assert!(
        text(&refused.stderr).contains("signature"),
        "{}",
        text(&refused.stderr)
    );
    std::fs::write(&receipt, text_of).unwrap();
    assert_eq!(verify(&dir).status.code(), Some(0));
    // Both runners' standing says they agreed.
    let (runners, _) = farm.get("/api/v1/runners");
    let runners: serde_json::Value = serde_json::from_slice(&runners).unwrap();
    for r in runners.as_array().unwrap() {
        assert_eq!(r["standing"]["agreed"], 1, "{r}");
    }
}

#[test]
fn replicas_see_one_clock_and_one_cpu_and_construir_output_makes_one_archive() {
    use construir_tools::pack::JobFile;
    let farm = Farm::start(&[]);
    let _runners = two_owners_runners(&farm);
    let script = "#!/bin/sh\nset -e\nmkdir -p /tmp/out\n\
        echo \"seconds $(date -u +%s)\"\n\
        date -u +%Y-%m-%dT%H:%M > /tmp/out/date.txt\n\
        echo \"$SOURCE_DATE_EPOCH\" > /tmp/out/epoch.txt\n\
        grep -m1 '^flags' /proc/cpuinfo > /tmp/out/flags.txt\n\
        cat /tmp/out/date.txt /tmp/out/epoch.txt /tmp/out/flags.txt\n\
        cd /tmp && construir-output out\n";
    let job = TestJob::new("clock", "t0", &[JobFile::script(script)], 1 << 20);
    let (id, view) = submit_twice(&farm, &job.path, "1M");
    assert_eq!(view["attestation"], "verified", "{view:#}");
    let epoch = view["created_ms"].as_u64().unwrap() / 1000;
    let attempts = view["attempts"].as_array().unwrap();
    let shas: Vec<&str> = attempts
        .iter()
        .map(|a| a["output_sha256"].as_str().expect("an output"))
        .collect();
    assert_eq!(shas.len(), 2);
    assert_eq!(
        shas[0], shas[1],
        "construir-output: one archive, bit for bit"
    );
    let (output, _) = farm.get(&format!("/api/v1/jobs/{id}/output"));
    let file = |name: &str| {
        let bytes = construir_contract::archive::read_file(&output[..], name, 4096)
            .unwrap()
            .unwrap_or_else(|| panic!("no {name} in the output"));
        text(&bytes).trim().to_string()
    };
    assert_eq!(
        file("out/epoch.txt"),
        epoch.to_string(),
        "SOURCE_DATE_EPOCH"
    );
    assert!(
        file("out/flags.txt").starts_with("flags"),
        "{}",
        file("out/flags.txt")
    );
    // Each console: the clock started at the job's time, not the host's.
    for a in attempts {
        let (log, _) = farm.get(&format!("/api/v1/jobs/{id}/log?attempt={}", a["id"]));
        let log = text(&log);
        let seconds: u64 = log
            .lines()
            .find_map(|l| l.strip_prefix("seconds "))
            .unwrap_or_else(|| panic!("no date in the console: {log}"))
            .trim()
            .parse()
            .unwrap();
        assert!(
            (epoch..epoch + 30).contains(&seconds),
            "the guest's clock {seconds} starts at the job's {epoch}"
        );
    }
}
