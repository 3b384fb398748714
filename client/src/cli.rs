//! The command line.

use construir_api::types::{AttemptId, JobId, MAX_PRIORITY, MIN_PRIORITY, valid_image_index};
use construir_contract::archive::Limits;
use construir_tools::pack::parse_size;
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Settings: --server or CONSTRUIR_SERVER; --token-file or CONSTRUIR_TOKEN (the token itself).
http:// is refused to anything but this machine (127.0.0.1, [::1], localhost) unless --insecure.

Exit codes: a finished job's, as the launchers give them (0-99 its exit status, 100 failed with
a status >= 100 or a signal, 101 invalid job, 102 timed out, 103 guest failed); 110 canceled;
111 errored (not the job's fault), expired or inconclusive (replicas disagreed); 112 refused by
the server; 113 server unreachable or failing; 114 bad usage or protocol mismatch; 115 local
failure (files, checksums, limits); 116 verification failed (construir verify: the receipt, the
record or the output does not check).

Examples:
  construir submit hello_i0.tar.xz --follow
  construir submit --dir examples/hello-c/opt/job --image i0 --output-size 64M --wait
  construir show 42
  construir fetch 42 -o out/
  construir verify out/ --server-key server-key.json";

#[derive(clap::Parser, Debug)]
#[command(
    name = "construir",
    version,
    about = "Submit construir build jobs to a server and follow, fetch or cancel them",
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Where to connect, for every subcommand.
#[derive(clap::Args, Debug)]
pub struct Global {
    /// The server's URL, https://HOST[:PORT][/PREFIX] (default: $CONSTRUIR_SERVER).
    #[arg(long, global = true, value_name = "URL", help_heading = "Connection")]
    pub server: Option<String>,
    /// A file holding the token (default: $CONSTRUIR_TOKEN, which holds the token itself).
    #[arg(long, global = true, value_name = "FILE", help_heading = "Connection")]
    pub token_file: Option<PathBuf>,
    /// Allow http:// to a host that is not this machine: the token then crosses the network in
    /// the clear.
    #[arg(long, global = true, help_heading = "Connection")]
    pub insecure: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Submit a job file, or a directory packed as construir-pack does; prints the job's id.
    Submit(SubmitArgs),
    /// Show a job: its state, limits and attempts.
    Show {
        /// The job's id (as submit prints it, or list shows it).
        id: JobId,
        /// The job as the API returns it (JobView JSON).
        #[arg(long)]
        json: bool,
    },
    /// Print a job's console.
    Logs {
        /// The job's id.
        id: JobId,
        /// Keep printing as the console grows, through every try, until the job ends; then exit
        /// with the job's exit code.
        #[arg(long, short)]
        follow: bool,
        /// This attempt's console (default: the job's last attempt).
        #[arg(long, value_name = "ATTEMPT_ID")]
        attempt: Option<AttemptId>,
        /// Print the console's bytes as they are, even to a terminal (default: control
        /// characters are shown escaped on a terminal, and kept as they are elsewhere).
        #[arg(long)]
        raw: bool,
    },
    /// Download a finished job: its output unpacked (within limits) and as its archive, its
    /// record and console, its receipt and the server's key.
    Fetch(FetchArgs),
    /// Check a fetched job offline: its receipt by the server's key and the runners' signed
    /// statements, and that the record and the output archive are the ones it speaks of.
    Verify(VerifyArgs),
    /// Cancel a job (a running one stops once its runner hears of it).
    Cancel {
        /// The job's id.
        id: JobId,
    },
    /// List your jobs, newest first (an admin's: everyone's).
    List {
        /// The jobs as the API returns them (a JSON list of JobView).
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// The job file, NAME_INDEX.tar.xz (INDEX is the image, like i0).
    #[arg(required_unless_present = "dir", conflicts_with = "dir")]
    pub job: Option<PathBuf>,
    /// Pack this directory (its top holds the job script, `construir`; .git is left out) into
    /// a job, as construir-pack does, and submit that.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    // "Only with --dir" is checked by `submit` itself: clap ignores a `requires` whose target
    // conflicts with an argument given (the job file).
    /// With --dir: the job's name (default: the directory's).
    #[arg(long)]
    pub name: Option<String>,
    /// The build image (default: the job file's INDEX; with --dir, i0).
    #[arg(long, value_parser = parse_image)]
    pub image: Option<String>,
    /// The job's time limit: 90, 90s, 30m, 2h (default: the server's, 30m).
    #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
    pub timeout: Option<u64>,
    /// The most output kept: 64M, 1G, or bytes (with --dir, also the room the job file gets;
    /// default there 64M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub output_size: Option<u64>,
    /// The most console kept: 16M, or bytes (default: the server's).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub console_cap: Option<u64>,
    /// Guest memory: 1G, 512M, or a plain number of MiB (default: the server's).
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_mib)]
    pub memory: Option<u32>,
    /// Guest vCPUs (default: the server's).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Order among your own jobs, -100 to 100, higher first (default 0).
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(MIN_PRIORITY as i64..=MAX_PRIORITY as i64))]
    pub priority: Option<i32>,
    /// Run the job on N runners of distinct owners (1 to 8, default 1); its result stands when
    /// --quorum of them agree on it (status, exit status, output tree).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=8))]
    pub replicas: Option<u32>,
    /// How many replicas must agree (1 to --replicas; default: all of them).
    #[arg(long, value_name = "Q", value_parser = clap::value_parser!(u32).range(1..=8))]
    pub quorum: Option<u32>,
    /// Let your own runners take replicas too (by default they take none of a replicated
    /// job: a check by your own machine is no check).
    #[arg(long)]
    pub own_runners: bool,
    /// Let replicas run on runners of different host classes (a TCG runner and a KVM one: other
    /// CPU models and speeds); by default all run on the class of the first.
    #[arg(long)]
    pub any_host_class: bool,
    /// Let one runner of good standing run the job alone where the server allows it
    /// (adaptive replication): fewer runs, and a result `on-standing` instead of `verified`
    /// unless the server's random audit runs the other replicas. Needs --quorum 2 or more.
    #[arg(long)]
    pub adaptive: bool,
    /// Show the job, its console and output only to you and admins (by default anyone may see
    /// them). It still runs on a stranger's machine: a job must carry no secrets.
    #[arg(long)]
    pub private: bool,
    /// Wait until the job ends, then exit with its exit code.
    #[arg(long)]
    pub wait: bool,
    /// Print the job's console as it comes, then exit with its exit code (implies --wait).
    #[arg(long)]
    pub follow: bool,
    /// With --follow: the console's bytes as they are, even to a terminal.
    #[arg(long, requires = "follow")]
    pub raw: bool,
}

#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// The job's id.
    pub id: JobId,
    /// The directory to fetch into: output/ (the files the job wrote back), output.archive (the
    /// output as downloaded), record.json (the job as the API returns it), console.log,
    /// receipt.json (the server's signed receipt, when it issued one) and server-key.json (the
    /// key it signs with): what `construir verify DIR` checks. output/ must not exist yet.
    #[arg(long, short, value_name = "DIR")]
    pub output: PathBuf,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Accepted for older scripts: the archive is always kept now, as output.archive.
    #[arg(long)]
    pub keep_archive: bool,
}

impl FetchArgs {
    /// The capped reader's limits, as construir-result takes them.
    pub fn limits(&self) -> Limits {
        self.limits.limits()
    }
}

/// How much of a job's output archive is read, by `fetch` and by `verify`.
#[derive(clap::Args, Debug)]
pub struct LimitArgs {
    /// Most bytes unpacking writes into files, in all (a decompression bomb stops here).
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = parse_size)]
    pub max_output: u64,
    /// Most entries the job's output may have.
    #[arg(long, value_name = "N", default_value_t = Limits::DEFAULT.max_entries)]
    pub max_entries: u64,
    /// Most bytes of decompressed tar read, whatever is done with them (default: twice
    /// --max-output).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_stream: Option<u64>,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_entries: self.max_entries,
            max_output: self.max_output,
            max_stream: self.max_stream.unwrap_or(self.max_output.saturating_mul(2)),
            ..Limits::DEFAULT
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// A directory `construir fetch` wrote: receipt.json, record.json and, when the result has
    /// an output, output.archive.
    pub dir: PathBuf,
    /// The server's public key, as 64 hex digits or a file holding them or the server's
    /// server-key JSON. Without it, DIR/server-key.json (the key fetch saved) is trusted: pass
    /// one obtained elsewhere to check the server too.
    #[arg(long, value_name = "KEY")]
    pub server_key: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

fn parse_image(text: &str) -> Result<String, String> {
    if valid_image_index(text) {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not an image index (a letter and digits, like i0)"
        ))
    }
}

fn parse_seconds(text: &str) -> Result<u64, String> {
    construir_launcher::duration::parse_duration(text).map(|d| d.as_secs())
}

/// Memory as a size (`1G`, `512M`) or a plain number of MiB; whole MiB only.
pub fn parse_memory_mib(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let mib = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>().map_err(|e| format!("{text:?}: {e}"))?
    } else {
        let bytes = parse_size(t)?;
        if bytes % (1 << 20) != 0 {
            return Err(format!("{text:?} is not a whole number of MiB"));
        }
        bytes >> 20
    };
    u32::try_from(mib).map_err(|_| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_flags_parse_into_their_units() {
        let cli = Cli::try_parse_from([
            "construir",
            "submit",
            "j_i0.tar.xz",
            "--timeout",
            "30m",
            "--memory",
            "1G",
            "--output-size",
            "64M",
            "--priority",
            "-5",
            "--vcpus",
            "2",
            "--server",
            "http://127.0.0.1:1",
        ])
        .unwrap();
        let Command::Submit(s) = cli.command else {
            panic!()
        };
        assert_eq!(
            (s.timeout, s.memory, s.output_size, s.priority, s.vcpus),
            (Some(1800), Some(1024), Some(64 << 20), Some(-5), Some(2))
        );
        assert_eq!(cli.global.server.as_deref(), Some("http://127.0.0.1:1"));
        for bad in [
            &["construir", "submit"][..],
            &["construir", "submit", "j_i0.tar.xz", "--dir", "d"],
            &["construir", "submit", "j_i0.tar.xz", "--priority", "101"],
            &["construir", "submit", "j_i0.tar.xz", "--image", "../x"],
            &["construir", "submit", "j_i0.tar.xz", "--raw"],
            &["construir", "show", "-1"],
            &["construir", "fetch", "1"],
            &["construir", "verify"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn memory_is_mib() {
        assert_eq!(parse_memory_mib("1G"), Ok(1024));
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("256"), Ok(256));
        assert!(parse_memory_mib("1000K").is_err() && parse_memory_mib("x").is_err());
    }

    #[test]
    fn fetch_limits_come_from_the_flags() {
        let cli = Cli::try_parse_from(["construir", "fetch", "3", "-o", "d", "--max-output", "1M"])
            .unwrap();
        let Command::Fetch(f) = cli.command else {
            panic!()
        };
        let l = f.limits();
        assert_eq!(
            (l.max_output, l.max_stream, l.max_entries),
            (1 << 20, 2 << 20, 1_000_000)
        );
    }

    #[test]
    fn verify_takes_a_directory_a_key_and_the_fetch_limits() {
        let cli = Cli::try_parse_from([
            "construir",
            "verify",
            "out",
            "--server-key",
            "k.json",
            "--max-entries",
            "5",
        ])
        .unwrap();
        let Command::Verify(v) = cli.command else {
            panic!()
        };
        assert_eq!(v.dir, PathBuf::from("out"));
        assert_eq!(v.server_key.as_deref(), Some("k.json"));
        assert_eq!(v.limits.limits().max_entries, 5);
        // The flag fetch kept for older scripts is still taken.
        let cli = Cli::try_parse_from(["construir", "fetch", "3", "-o", "d", "--keep-archive"]);
        assert!(matches!(
            cli.unwrap().command,
            Command::Fetch(FetchArgs {
                keep_archive: true,
                ..
            })
        ));
    }
}
