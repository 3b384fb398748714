//! Identifiers and roles.

use serde::{Deserialize, Serialize};

/// Why a path segment is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an id (expected a decimal number)")]
pub struct IdError(String);

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// On the wire and in paths it is a plain number; the newtype keeps a job id from being
        /// passed where an attempt id is expected.
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize,
            Deserialize,
        )]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                // u64::from_str takes a leading '+'; paths hold digits only.
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(IdError(s.chars().take(40).collect()));
                }
                s.parse().map($name).map_err(|_| IdError(s.chars().take(40).collect()))
            }
        }
    };
}

id_type!(
    /// A job: one submitted job file and everything that happens to it.
    JobId
);
id_type!(
    /// One try of a job on one runner (a lease, then a run, then a report).
    AttemptId
);
id_type!(
    /// A registered runner.
    RunnerId
);
id_type!(
    /// A user (a submitter, a runner's owner, an admin).
    UserId
);

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submits jobs and reads its own jobs.
    Submitter,
    /// Claims, runs and reports attempts.
    Runner,
    /// Everything, including other users' jobs and runners.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Submitter, Role::Runner, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Submitter => "submitter",
            Role::Runner => "runner",
            Role::Admin => "admin",
        }
    }
}

/// Why a role name is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a role (expected submitter, runner or admin)")]
pub struct RoleError(String);

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = RoleError;

    fn from_str(s: &str) -> Result<Self, RoleError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| RoleError(s.chars().take(40).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_numbers_on_the_wire_and_in_paths() {
        assert_eq!(serde_json::to_string(&JobId(42)).unwrap(), "42");
        assert_eq!(
            serde_json::from_str::<AttemptId>("7").unwrap(),
            AttemptId(7)
        );
        assert_eq!(RunnerId(3).to_string(), "3");
        assert_eq!(
            "18446744073709551615".parse::<UserId>(),
            Ok(UserId(u64::MAX))
        );
        for bad in ["", "+1", "-1", "1a", "18446744073709551616", " 1"] {
            assert!(bad.parse::<JobId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn roles_round_trip_through_text_and_json() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>(), Ok(role));
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{role}\""));
        }
        let e = "Admin".parse::<Role>().unwrap_err();
        assert!(e.to_string().contains("submitter, runner or admin"), "{e}");
    }
}
