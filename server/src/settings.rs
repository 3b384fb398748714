//! The server's settings: each one a flag, the same name in a TOML config file (`--config`), and a
//! `CONSTRUIR_SERVER_*` variable. A flag or a variable wins over the file, the file over the
//! default.

use crate::blobs::StoreUrl;
use crate::db::DatabaseUrl;
use construir_launcher::size::parse_size;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings as given (flags and variables, through clap), each optional.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SettingArgs {
    /// The data directory: the database, the blobs (default: /var/lib/construir/server).
    #[arg(long, env = "CONSTRUIR_SERVER_DATA")]
    pub data: Option<PathBuf>,
    /// The database: a `postgres://USER:PASSWORD@HOST/DB` URL, shared by every server of a farm
    /// (default: the embedded SQLite in the data directory). Give a password through the
    /// variable or the config file, not the flag: a flag shows in `ps`.
    #[arg(long, env = "CONSTRUIR_SERVER_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// The blob store: `s3://BUCKET` (endpoint, region and keys from the usual AWS_* variables),
    /// shared by every server of a farm (default: the data directory's blobs/).
    #[arg(long, env = "CONSTRUIR_SERVER_STORE")]
    pub store: Option<String>,
    /// A TOML file with any of these settings (same names, with underscores).
    #[arg(long, env = "CONSTRUIR_SERVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where to listen (default 127.0.0.1:8080: put a TLS reverse proxy in front for the world).
    #[arg(long, env = "CONSTRUIR_SERVER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// How long an attempt's lease lasts without a heartbeat (default 90s).
    #[arg(long, env = "CONSTRUIR_SERVER_LEASE", value_parser = parse_secs)]
    pub lease: Option<u64>,
    /// How long a runner has to start a job it claimed (default 30s).
    #[arg(long, env = "CONSTRUIR_SERVER_ACCEPT_WINDOW", value_parser = parse_secs)]
    pub accept_window: Option<u64>,
    /// The largest job file accepted, in bytes or 64M/1G (default 1G).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_JOB_SIZE", value_parser = parse_size)]
    pub max_job_size: Option<u64>,
    /// The largest output a job may set as its limit (default 4G).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_OUTPUT_SIZE", value_parser = parse_size)]
    pub max_output_size: Option<u64>,
    /// How long a job no runner takes stays queued (default 24h).
    #[arg(long, env = "CONSTRUIR_SERVER_JOB_TTL", value_parser = parse_secs)]
    pub job_ttl: Option<u64>,
    /// Attempts a job gets when runners fail it (not the job itself) before it is errored
    /// (default 3).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_TRIES")]
    pub max_tries: Option<u32>,
    /// How long outputs and logs are kept (default 30d; 0: forever).
    #[arg(long, env = "CONSTRUIR_SERVER_RETENTION", value_parser = parse_secs)]
    pub retention: Option<u64>,
    /// Jobs one user may have waiting in the queue; a submission past it is refused with 429
    /// (default 10000).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_QUEUED_PER_USER")]
    pub max_queued_per_user: Option<u64>,
    /// Jobs of one user running at once; more wait in the queue, their reason says why
    /// (default 500).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_RUNNING_PER_USER")]
    pub max_running_per_user: Option<u64>,
    /// Bytes one user may keep stored (job files, outputs, consoles), in bytes or 64M/100G; a
    /// submission past it is refused with 429 (default 100G; 0: no limit).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_STORED_PER_USER", value_parser = parse_size)]
    pub max_stored_per_user: Option<u64>,
    /// API requests a second one user may make with their tokens (bursts of five seconds'
    /// worth); past it, 429 (default 20; 0: no limit).
    #[arg(long, env = "CONSTRUIR_SERVER_REQUESTS_PER_SECOND")]
    pub requests_per_second: Option<u32>,
    /// Adaptive replication: a runner whose last N votes agreed with a quorum may run a job
    /// submitted with `--adaptive` alone; its result is then `on-standing`, not `verified`
    /// (default 0: never).
    #[arg(long, env = "CONSTRUIR_SERVER_ADAPTIVE_AFTER")]
    pub adaptive_after: Option<u64>,
    /// The chance, in percent, that a run alone is audited: after its vote, the job's other
    /// replicas run and the quorum is counted as for any replicated job (default 10; 0: runs
    /// alone are never checked, their results stand on standing only).
    #[arg(long, env = "CONSTRUIR_SERVER_AUDIT_PERCENT",
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub audit_percent: Option<u8>,
    /// The address people reach the server at (`https://farm.example`), for the website's
    /// links and its cookies (`Secure` behind https); default: `http://` + `--listen`.
    #[arg(long, env = "CONSTRUIR_SERVER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Let anyone make an account on the website ("everybody can join"; rate-limited by
    /// address). Off by default: accounts are made with `construir-server user add`.
    #[arg(long, env = "CONSTRUIR_SERVER_OPEN_SIGNUP", num_args = 0..=1,
          default_missing_value = "true")]
    pub open_signup: Option<bool>,
}

/// The same settings in a config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    data: Option<PathBuf>,
    database: Option<String>,
    store: Option<String>,
    listen: Option<SocketAddr>,
    lease: Option<String>,
    accept_window: Option<String>,
    max_job_size: Option<String>,
    max_output_size: Option<String>,
    job_ttl: Option<String>,
    max_tries: Option<u32>,
    retention: Option<String>,
    max_queued_per_user: Option<u64>,
    max_running_per_user: Option<u64>,
    max_stored_per_user: Option<String>,
    requests_per_second: Option<u32>,
    adaptive_after: Option<u64>,
    audit_percent: Option<u8>,
    public_url: Option<String>,
    open_signup: Option<bool>,
}

/// The settings in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub data: PathBuf,
    /// None: the embedded SQLite.
    pub database: Option<DatabaseUrl>,
    /// None: the data directory's blobs/.
    pub store: Option<StoreUrl>,
    pub listen: SocketAddr,
    pub lease: Duration,
    pub accept_window: Duration,
    pub max_job_size: u64,
    pub max_output_size: u64,
    pub job_ttl: Duration,
    pub max_tries: u32,
    pub retention: Option<Duration>,
    pub max_queued_per_user: u64,
    pub max_running_per_user: u64,
    /// 0: no limit.
    pub max_stored_per_user: u64,
    /// Per user, with bursts of five seconds' worth; 0: no limit.
    pub requests_per_second: u32,
    /// Votes agreed in a row that let a runner run an adaptive job alone; 0: never.
    pub adaptive_after: u64,
    /// The chance, in percent (0 to 100), that a run alone is audited.
    pub audit_percent: u8,
    /// Where people reach the server, without a trailing slash (`https://farm.example`).
    pub public_url: String,
    pub open_signup: bool,
}

impl Settings {
    /// The path the website lives under (`/farm` for `https://x.example/farm`; empty at the
    /// root): a reverse proxy that strips it serves the pages' links right.
    pub fn base_path(&self) -> &str {
        let after_scheme = self.public_url.split_once("://").map_or("", |(_, r)| r);
        after_scheme.find('/').map_or("", |i| &after_scheme[i..])
    }

    /// Whether cookies are `Secure` (the public address is https).
    pub fn secure_cookies(&self) -> bool {
        self.public_url.starts_with("https://")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{key} in {path}: {message}")]
    Value {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

impl SettingArgs {
    /// Merges flags and variables over the config file over the defaults.
    pub fn resolve(&self) -> Result<Settings, SettingsError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let path = self.config.clone().unwrap_or_default();
        let from_file =
            |key: &'static str, v: &Option<String>, parse: fn(&str) -> Result<u64, String>| {
                v.as_deref()
                    .map(|t| {
                        parse(t).map_err(|message| SettingsError::Value {
                            path: path.clone(),
                            key,
                            message,
                        })
                    })
                    .transpose()
            };
        let lease = self
            .lease
            .or(from_file("lease", &file.lease, parse_secs)?)
            .unwrap_or(90);
        let retention = self
            .retention
            .or(from_file("retention", &file.retention, parse_secs)?)
            .unwrap_or(30 * 86400);
        let database = match self.database.clone().or(file.database) {
            None => None,
            Some(url) => {
                Some(
                    DatabaseUrl::parse(&url).map_err(|message| SettingsError::Value {
                        path: path.clone(),
                        key: "database",
                        message,
                    })?,
                )
            }
        };
        let store = match self.store.clone().or(file.store) {
            None => None,
            Some(url) => Some(
                StoreUrl::parse(&url).map_err(|message| SettingsError::Value {
                    path: path.clone(),
                    key: "store",
                    message,
                })?,
            ),
        };
        Ok(Settings {
            database,
            store,
            data: self
                .data
                .clone()
                .or(file.data)
                .unwrap_or_else(|| PathBuf::from("/var/lib/construir/server")),
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            lease: Duration::from_secs(lease.max(1)),
            accept_window: Duration::from_secs(
                self.accept_window
                    .or(from_file("accept_window", &file.accept_window, parse_secs)?)
                    .unwrap_or(30)
                    .max(1),
            ),
            max_job_size: self
                .max_job_size
                .or(from_file("max_job_size", &file.max_job_size, parse_size)?)
                .unwrap_or(1 << 30),
            max_output_size: self
                .max_output_size
                .or(from_file(
                    "max_output_size",
                    &file.max_output_size,
                    parse_size,
                )?)
                .unwrap_or(4 << 30),
            job_ttl: Duration::from_secs(
                self.job_ttl
                    .or(from_file("job_ttl", &file.job_ttl, parse_secs)?)
                    .unwrap_or(86400),
            ),
            max_tries: self.max_tries.or(file.max_tries).unwrap_or(3).max(1),
            retention: (retention > 0).then(|| Duration::from_secs(retention)),
            max_queued_per_user: self
                .max_queued_per_user
                .or(file.max_queued_per_user)
                .unwrap_or(10_000),
            max_running_per_user: self
                .max_running_per_user
                .or(file.max_running_per_user)
                .unwrap_or(500)
                .max(1),
            max_stored_per_user: self
                .max_stored_per_user
                .or(from_file(
                    "max_stored_per_user",
                    &file.max_stored_per_user,
                    parse_size,
                )?)
                .unwrap_or(100 << 30),
            requests_per_second: self
                .requests_per_second
                .or(file.requests_per_second)
                .unwrap_or(20),
            public_url: {
                let listen = self
                    .listen
                    .or(file.listen)
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
                let url = self
                    .public_url
                    .clone()
                    .or(file.public_url)
                    .unwrap_or_else(|| format!("http://{listen}"));
                let url = url.trim_end_matches('/').to_string();
                if !(url.starts_with("http://") || url.starts_with("https://"))
                    || url.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(SettingsError::Value {
                        path,
                        key: "public_url",
                        message: format!("{url:?} is not an http:// or https:// address"),
                    });
                }
                url
            },
            open_signup: self.open_signup.or(file.open_signup).unwrap_or(false),
            adaptive_after: self.adaptive_after.or(file.adaptive_after).unwrap_or(0),
            audit_percent: match self.audit_percent.or(file.audit_percent).unwrap_or(10) {
                p @ 0..=100 => p,
                p => {
                    return Err(SettingsError::Value {
                        path,
                        key: "audit_percent",
                        message: format!("{p} is not a percentage (0 to 100)"),
                    });
                }
            },
        })
    }
}

fn read_file(path: &Path) -> Result<FileSettings, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| SettingsError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// `90s`, `30m`, `2h`, `7d`, or seconds (the launchers' rule), as whole seconds.
pub fn parse_secs(text: &str) -> Result<u64, String> {
    construir_launcher::duration::parse_span(text).map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("server.toml");
        std::fs::write(
            &cfg,
            "listen = \"127.0.0.1:9999\"\nlease = \"2m\"\nmax_job_size = \"64M\"\n",
        )
        .unwrap();
        let args = SettingArgs {
            config: Some(cfg.clone()),
            lease: Some(45),
            ..SettingArgs::default()
        };
        let s = args.resolve().unwrap();
        assert_eq!(s.listen.port(), 9999, "from the file");
        assert_eq!(s.lease, Duration::from_secs(45), "the flag wins");
        assert_eq!(s.max_job_size, 64 << 20);
        assert_eq!(s.accept_window, Duration::from_secs(30), "the default");
        assert_eq!(s.retention, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(s.max_queued_per_user, 10_000);
        assert_eq!(
            (s.adaptive_after, s.audit_percent),
            (0, 10),
            "no runs alone"
        );
        assert_eq!(s.public_url, "http://127.0.0.1:9999");
        assert_eq!(
            (s.base_path(), s.secure_cookies(), s.open_signup),
            ("", false, false)
        );
        let behind = SettingArgs {
            public_url: Some("https://farm.example/ci/".into()),
            ..SettingArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!((behind.base_path(), behind.secure_cookies()), ("/ci", true));
        let bad = SettingArgs {
            public_url: Some("ftp://x".into()),
            ..SettingArgs::default()
        };
        assert!(
            bad.resolve()
                .unwrap_err()
                .to_string()
                .contains("public_url")
        );

        std::fs::write(&cfg, "lease = \"soon\"\n").unwrap();
        let e = args_with(&cfg).resolve().unwrap_err().to_string();
        assert!(e.contains("lease"), "{e}");
        std::fs::write(&cfg, "audit_percent = 101\n").unwrap();
        let e = args_with(&cfg).resolve().unwrap_err().to_string();
        assert!(e.contains("audit_percent") && e.contains("101"), "{e}");
        std::fs::write(&cfg, "leese = \"1s\"\n").unwrap();
        assert!(matches!(
            args_with(&cfg).resolve(),
            Err(SettingsError::Parse { .. })
        ));
    }

    fn args_with(cfg: &Path) -> SettingArgs {
        SettingArgs {
            config: Some(cfg.to_path_buf()),
            ..SettingArgs::default()
        }
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_secs("90s").unwrap(), 90);
        assert_eq!(parse_secs("2h").unwrap(), 7200);
        assert_eq!(parse_secs("7d").unwrap(), 7 * 86400);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert!(parse_secs("x").is_err() && parse_size("1.5G").is_err());
    }
}
