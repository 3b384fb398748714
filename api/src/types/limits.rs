//! A job's resource limits.

use serde::{Deserialize, Serialize};

/// What a job may use. The server fixes them at submission (its defaults, the submitter's
/// overrides, never above its maxima); a runner takes a job only if it can give all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobLimits {
    /// The job's run time limit in seconds (the launchers' `--timeout`); boot time is allowed on
    /// top by the runner.
    pub timeout_s: u64,
    /// The most bytes of output (the job file as the job left it) the runner uploads and the
    /// server keeps.
    pub output_size: u64,
    /// The most console bytes kept (the launchers' `--console-cap`); the console is cut, not the
    /// job.
    pub console_cap: u64,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u32,
}

impl JobLimits {
    /// The smallest value of each limit anyone may ask for (memory: the smallest an image may
    /// declare, construir-contract's `MEMORY_MIB_RANGE`). A console cap of 0 keeps no console.
    pub const MIN: JobLimits = JobLimits {
        timeout_s: 1,
        output_size: 1,
        console_cap: 0,
        memory_mib: 64,
        vcpus: 1,
    };

    /// What a job gets when the submitter asks for nothing: the launchers' defaults (30 min,
    /// 16 MiB of console) and image i0's guest (1 GiB, 2 vCPUs).
    pub const DEFAULT: JobLimits = JobLimits {
        timeout_s: 30 * 60,
        output_size: 1 << 30,
        console_cap: 16 << 20,
        memory_mib: 1024,
        vcpus: 2,
    };

    /// A server's maxima unless its configuration says otherwise: the runner's largest job file
    /// (8 GiB) and the launchers' largest guest (32 vCPUs).
    pub const DEFAULT_SERVER_MAX: JobLimits = JobLimits {
        timeout_s: 6 * 3600,
        output_size: 8 << 30,
        console_cap: 64 << 20,
        memory_mib: 16 * 1024,
        vcpus: 32,
    };

    /// Checks every limit against [`JobLimits::MIN`] and `server_max`; the error names the first
    /// field that is out of range.
    pub fn validate(&self, server_max: &JobLimits) -> Result<(), LimitError> {
        let fields = [
            (
                "timeout_s",
                self.timeout_s,
                Self::MIN.timeout_s,
                server_max.timeout_s,
            ),
            (
                "output_size",
                self.output_size,
                Self::MIN.output_size,
                server_max.output_size,
            ),
            (
                "console_cap",
                self.console_cap,
                Self::MIN.console_cap,
                server_max.console_cap,
            ),
            (
                "memory_mib",
                self.memory_mib.into(),
                Self::MIN.memory_mib.into(),
                server_max.memory_mib.into(),
            ),
            (
                "vcpus",
                self.vcpus.into(),
                Self::MIN.vcpus.into(),
                server_max.vcpus.into(),
            ),
        ];
        for (field, value, min, max) in fields {
            if value < min {
                return Err(LimitError {
                    field,
                    value,
                    bound: Bound::Min(min),
                });
            }
            if value > max {
                return Err(LimitError {
                    field,
                    value,
                    bound: Bound::Max(max),
                });
            }
        }
        Ok(())
    }
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits::DEFAULT
    }
}

/// Which bound a limit broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Below the smallest value anyone may ask for.
    Min(u64),
    /// Above this server's maximum.
    Max(u64),
}

/// A limit out of range, naming the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value} is {}", match bound {
    Bound::Min(min) => format!("below the minimum of {min}"),
    Bound::Max(max) => format!("above this server's maximum of {max}"),
})]
pub struct LimitError {
    pub field: &'static str,
    pub value: u64,
    pub bound: Bound,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_within_the_default_maxima() {
        assert_eq!(JobLimits::default(), JobLimits::DEFAULT);
        JobLimits::DEFAULT
            .validate(&JobLimits::DEFAULT_SERVER_MAX)
            .unwrap();
        JobLimits::MIN
            .validate(&JobLimits::DEFAULT_SERVER_MAX)
            .unwrap();
        JobLimits::DEFAULT_SERVER_MAX
            .validate(&JobLimits::DEFAULT_SERVER_MAX)
            .unwrap();
    }

    #[test]
    fn an_out_of_range_limit_is_named() {
        let max = JobLimits::DEFAULT_SERVER_MAX;
        let too_much = JobLimits {
            memory_mib: max.memory_mib + 1,
            ..JobLimits::DEFAULT
        };
        let e = too_much.validate(&max).unwrap_err();
        assert_eq!(e.field, "memory_mib");
        assert_eq!(e.bound, Bound::Max(max.memory_mib.into()));
        assert_eq!(
            e.to_string(),
            "memory_mib 16385 is above this server's maximum of 16384"
        );
        let zero = JobLimits {
            timeout_s: 0,
            ..JobLimits::DEFAULT
        };
        let e = zero.validate(&max).unwrap_err();
        assert_eq!((e.field, e.bound), ("timeout_s", Bound::Min(1)));
        assert_eq!(e.to_string(), "timeout_s 0 is below the minimum of 1");
        let no_vcpu = JobLimits {
            vcpus: 0,
            ..JobLimits::DEFAULT
        };
        assert_eq!(no_vcpu.validate(&max).unwrap_err().field, "vcpus");
    }

    #[test]
    fn limits_are_the_documented_json() {
        let json = serde_json::to_value(JobLimits::DEFAULT).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "timeout_s": 1800, "output_size": 1u64 << 30, "console_cap": 16u64 << 20,
                "memory_mib": 1024, "vcpus": 2
            })
        );
    }
}
