//! Who may see and change a job: the same rules for the API and the website.
//!
//! A public job (the default) is anyone's to see: its page, console, output and receipt. A
//! private one is seen only by its owner and admins; to anyone else it does not exist (404, not
//! 403: its existence is not their business). Only its owner and admins change a job (cancel,
//! resubmit, delete).

use crate::http::{Caller, Refusal};
use crate::jobs::StoredJob;
use crate::service::Shared;
use construir_api::codes;
use construir_api::state::JobFacts;
use construir_api::types::{JobId, UserId};

/// Who looks: a user (an admin or not), or nobody signed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewer {
    pub user: Option<UserId>,
    pub admin: bool,
}

impl Viewer {
    pub const ANONYMOUS: Viewer = Viewer {
        user: None,
        admin: false,
    };

    pub fn of(caller: &Caller) -> Viewer {
        Viewer {
            user: Some(UserId(caller.0.user_id as u64)),
            admin: caller.0.role == "admin",
        }
    }

    pub fn may_see(&self, facts: &JobFacts) -> bool {
        !facts.private || self.may_change(facts)
    }

    pub fn may_change(&self, facts: &JobFacts) -> bool {
        self.admin || self.user == Some(facts.owner)
    }
}

/// Job `id`, if `viewer` may see it. A deleted job ([`crate::deletion`]) is no one's to see.
pub async fn seen_job(app: &Shared, viewer: Viewer, id: JobId) -> Result<StoredJob, Refusal> {
    let job = app
        .db
        .load_job(id)
        .await?
        .filter(|j| viewer.may_see(&j.facts));
    match job {
        Some(j) if app.db.job_deleted_at(id).await?.is_none() => Ok(j),
        _ => Err(Refusal::new(codes::NOT_FOUND, format!("no job {id}"))),
    }
}

/// Job `id`, if `viewer` may change it (a job they may only see is refused 403, saying why).
pub async fn owned_job(app: &Shared, viewer: Viewer, id: JobId) -> Result<StoredJob, Refusal> {
    let job = seen_job(app, viewer, id).await?;
    if !viewer.may_change(&job.facts) {
        return Err(Refusal::new(
            codes::FORBIDDEN,
            format!("job {id} is not yours: only its owner or an admin may change it"),
        ));
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_api::types::JobLimits;

    fn facts(owner: u64, private: bool) -> JobFacts {
        JobFacts {
            id: JobId(1),
            owner: UserId(owner),
            name: "a_i0.tar.xz".into(),
            image: "i0".into(),
            image_digest: None,
            sha256: "0".repeat(64),
            size: 1,
            limits: JobLimits::DEFAULT,
            priority: 0,
            private,
        }
    }

    #[test]
    fn public_jobs_are_seen_by_anyone_private_ones_by_their_owner_and_admins() {
        let alice = Viewer {
            user: Some(UserId(1)),
            admin: false,
        };
        let bob = Viewer {
            user: Some(UserId(2)),
            admin: false,
        };
        let admin = Viewer {
            user: Some(UserId(3)),
            admin: true,
        };
        for v in [alice, bob, admin, Viewer::ANONYMOUS] {
            assert!(v.may_see(&facts(1, false)));
        }
        assert!(alice.may_see(&facts(1, true)) && admin.may_see(&facts(1, true)));
        assert!(!bob.may_see(&facts(1, true)) && !Viewer::ANONYMOUS.may_see(&facts(1, true)));
        assert!(alice.may_change(&facts(1, false)) && admin.may_change(&facts(1, false)));
        assert!(!bob.may_change(&facts(1, false)));
        assert!(!Viewer::ANONYMOUS.may_change(&facts(1, false)));
    }
}
