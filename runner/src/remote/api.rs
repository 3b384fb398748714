//! The runner's endpoints (docs/api.md, "Runners" and "One attempt"), each one exchange: what
//! retries, and when, is the caller's. The runner's own token only registers and claims; every
//! call about an attempt carries that attempt's token.

use super::client::{ApiFailure, Client, Payload, RUNNER_HEADER, read_json};
use construir_api::types::{
    AbortRequest, AttemptId, ClaimRequest, ClaimResponse, HeartbeatRequest, HeartbeatResponse,
    LogOffsetResponse, ReportRequest, RunnerId,
};
use serde::Deserialize;
use std::io::Read;
use ureq::http::Method;

/// The runner's own calls.
#[derive(Clone)]
pub struct RunnerApi {
    pub client: Client,
    token: String,
}

#[derive(Deserialize)]
struct Registered {
    runner_id: RunnerId,
}

impl RunnerApi {
    pub fn new(client: Client, token: String) -> Self {
        RunnerApi { client, token }
    }

    /// `POST /api/v1/runner/register`: the runner's id under its token's user (the same name
    /// gives the same id again).
    pub fn register(&self, name: &str, public_key: &str) -> Result<RunnerId, ApiFailure> {
        let answer: Option<Registered> = self.client.json(
            Method::POST,
            "/api/v1/runner/register",
            &self.token,
            &[],
            &serde_json::json!({ "name": name, "public_key": public_key }),
        )?;
        answer
            .map(|r| r.runner_id)
            .ok_or_else(|| ApiFailure::BadAnswer("register answered with no body".into()))
    }

    /// `POST /api/v1/runner/claim`, a long poll: an attempt, or `None` when no job came within
    /// `claim.wait_s`.
    pub fn claim(
        &self,
        runner: RunnerId,
        claim: &ClaimRequest,
    ) -> Result<Option<ClaimResponse>, ApiFailure> {
        self.client.json(
            Method::POST,
            "/api/v1/runner/claim",
            &self.token,
            &[(RUNNER_HEADER, runner.to_string())],
            claim,
        )
    }
}

/// What a log piece's answer says: every byte before the offset has been received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogAnswer {
    /// Taken (202), or held already (200).
    Taken(u64),
    /// Not adjacent (416): resend from here.
    Gap(u64),
}

/// The output upload's answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Uploaded {
    pub sha256: String,
    pub size: u64,
}

/// The calls about one attempt, with its own token.
#[derive(Clone)]
pub struct AttemptApi {
    pub client: Client,
    pub id: AttemptId,
    token: String,
}

impl AttemptApi {
    pub fn new(client: Client, id: AttemptId, token: String) -> Self {
        AttemptApi { client, id, token }
    }

    fn path(&self, what: &str) -> String {
        format!("/api/v1/runner/attempts/{}/{what}", self.id)
    }

    fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        body: Payload<'_>,
    ) -> Result<T, ApiFailure> {
        let response =
            self.client
                .exchange(Method::POST, &self.path(what), &self.token, &[], body, &[])?;
        read_json(response)?.ok_or_else(|| ApiFailure::BadAnswer(format!("{what}: no body")))
    }

    /// `POST …/start`: must come before the claim's `accept_by_ms`.
    pub fn start(&self) -> Result<HeartbeatResponse, ApiFailure> {
        self.post_json("start", Payload::None)
    }

    pub fn heartbeat(&self, beat: &HeartbeatRequest) -> Result<HeartbeatResponse, ApiFailure> {
        self.post_json(
            "heartbeat",
            Payload::Json(serde_json::to_vec(beat).expect("json")),
        )
    }

    /// `GET …/job`: the job file, as a reader of at most `limit` bytes.
    pub fn job(&self, limit: u64) -> Result<(Option<u64>, impl Read + use<>), ApiFailure> {
        let response = self.client.exchange(
            Method::GET,
            &self.path("job"),
            &self.token,
            &[],
            Payload::None,
            &[],
        )?;
        let (_, body) = response.into_parts();
        let length = body.content_length();
        Ok((length, body.into_with_config().limit(limit).reader()))
    }

    /// `PATCH …/log?offset=N` with one piece.
    pub fn append_log(&self, offset: u64, piece: &[u8]) -> Result<LogAnswer, ApiFailure> {
        let response = self.client.exchange(
            Method::PATCH,
            &format!("{}?offset={offset}", self.path("log")),
            &self.token,
            &[],
            Payload::Bytes(piece),
            &[416],
        )?;
        let gap = response.status().as_u16() == 416;
        let answer: LogOffsetResponse =
            read_json(response)?.ok_or_else(|| ApiFailure::BadAnswer("log: no body".into()))?;
        Ok(if gap {
            LogAnswer::Gap(answer.next_offset)
        } else {
            LogAnswer::Taken(answer.next_offset)
        })
    }

    /// `PUT …/output`: `len` bytes of `reader`.
    pub fn upload(&self, len: u64, reader: &mut dyn Read) -> Result<Uploaded, ApiFailure> {
        let response = self.client.exchange(
            Method::PUT,
            &self.path("output"),
            &self.token,
            &[],
            Payload::Reader { len, reader },
            &[],
        )?;
        read_json(response)?.ok_or_else(|| ApiFailure::BadAnswer("output: no body".into()))
    }

    /// `POST …/report` (the answer, an `AttemptView`, is not needed).
    pub fn report(&self, report: &ReportRequest) -> Result<(), ApiFailure> {
        let _: serde_json::Value = self.post_json(
            "report",
            Payload::Json(serde_json::to_vec(report).expect("json")),
        )?;
        Ok(())
    }

    /// `POST …/abort`: the runner gives the attempt up; the job goes back to the queue.
    pub fn abort(&self, reason: &str) -> Result<(), ApiFailure> {
        let body = AbortRequest {
            reason: reason.to_string(),
        };
        let response = self.client.exchange(
            Method::POST,
            &self.path("abort"),
            &self.token,
            &[],
            Payload::Json(serde_json::to_vec(&body).expect("json")),
            &[],
        )?;
        drop(response);
        Ok(())
    }
}
