//! `/submit`: a job submitted through a form, for a signed-in person. Either a job file as
//! `construir-pack` makes it, or a source tarball and a build script, which the server packs
//! into a job the way `construir-pack` would: the script becomes `opt/job/build.sh`, the
//! tarball `opt/job/source.tar…` as uploaded, and a small `opt/job/construir` unpacks the
//! tarball into `/opt/job/src` in the VM and runs the script there. The tarball is never
//! unpacked on the server: the VM is where a stranger's archive is opened.
//!
//! The form is multipart; its CSRF token comes first and is checked before any file is read,
//! and the file comes last, streamed to the blob store within the server's job size limit.

use super::session::Visitor;
use super::{Chrome, WebError, render};
use crate::service::Shared;
use askama::Template;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use construir_api::types::{MAX_REPLICAS, SubmitParams, UserId};
use construir_contract::source_job::{BUILD_SCRIPT, SOURCE_DIR};
use futures::TryStreamExt;

pub fn routes() -> Router<Shared> {
    Router::new().route(
        "/submit",
        get(form)
            .post(submit)
            // The job file has the server's own limit, checked as it streams in.
            .layer(DefaultBodyLimit::disable()),
    )
}

/// The most a build script typed into the form may hold.
const MAX_SCRIPT: usize = 256 << 10;

#[derive(Template)]
#[template(path = "submit.html")]
struct SubmitPage {
    chrome: Chrome,
    images: Vec<String>,
    problem: String,
    max_replicas: u32,
    max_job_size: String,
}

async fn images_offered(app: &Shared) -> Vec<String> {
    let mut images: Vec<String> = app
        .db
        .list_images()
        .await
        .map(|l| {
            l.into_iter()
                .filter(|i| i.current)
                .map(|i| i.index)
                .collect()
        })
        .unwrap_or_default();
    for default in ["i0", "t0"] {
        if !images.iter().any(|i| i == default) {
            images.push(default.to_string());
        }
    }
    images.sort();
    images
}

async fn page(
    app: &Shared,
    visitor: &Visitor,
    status: StatusCode,
    problem: String,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome("Submit a job");
    let page = SubmitPage {
        images: images_offered(app).await,
        problem,
        max_replicas: MAX_REPLICAS,
        max_job_size: super::bytes(app.settings.max_job_size),
        chrome: chrome.clone(),
    };
    let mut r = render(&page, &chrome)?;
    *r.status_mut() = status;
    Ok(r)
}

async fn form(State(app): State<Shared>, visitor: Visitor) -> Result<Response, WebError> {
    visitor.signed_in()?;
    page(&app, &visitor, StatusCode::OK, String::new()).await
}

/// The form's text fields, as they came before its file.
#[derive(Default)]
struct Fields {
    csrf: Option<String>,
    kind: String,
    name: String,
    image: String,
    timeout_min: String,
    output_size: String,
    vcpus: String,
    memory_mib: String,
    replicas: String,
    private: bool,
    script: String,
}

impl Fields {
    fn set(&mut self, name: &str, value: String) {
        match name {
            "csrf" => self.csrf = Some(value),
            "kind" => self.kind = value,
            "name" => self.name = value,
            "image" => self.image = value,
            "timeout_min" => self.timeout_min = value,
            "output_size" => self.output_size = value,
            "vcpus" => self.vcpus = value,
            "memory_mib" => self.memory_mib = value,
            "replicas" => self.replicas = value,
            "private" => self.private = value == "on" || value == "true",
            "script" => self.script = value,
            _ => {}
        }
    }

    /// The submission's parameters, or what is wrong with them.
    fn params(&self) -> Result<SubmitParams, String> {
        let number = |what: &str, text: &str| -> Result<Option<u64>, String> {
            let t = text.trim();
            if t.is_empty() {
                return Ok(None);
            }
            t.parse::<u64>()
                .map(Some)
                .map_err(|_| format!("{what}: {:?} is not a whole number", excerpt(t)))
        };
        let output_size = match self.output_size.trim() {
            "" => None,
            t => Some(
                construir_launcher::size::parse_size(t).map_err(|e| format!("output size: {e}"))?,
            ),
        };
        let image = self.image.trim();
        Ok(SubmitParams {
            image: (!image.is_empty()).then(|| image.to_string()),
            timeout_s: number("time limit", &self.timeout_min)?.map(|m| m.saturating_mul(60)),
            output_size,
            vcpus: number("vCPUs", &self.vcpus)?.map(|v| v.min(u64::from(u32::MAX)) as u32),
            memory_mib: number("memory", &self.memory_mib)?
                .map(|v| v.min(u64::from(u32::MAX)) as u32),
            replicas: number("replicas", &self.replicas)?
                .map(|r| r.min(u64::from(u32::MAX)) as u32),
            private: Some(self.private),
            ..SubmitParams::default()
        })
    }
}

fn excerpt(text: &str) -> String {
    text.chars().take(40).collect()
}

async fn submit(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: axum::http::HeaderMap,
    mut multipart: Multipart,
) -> Result<Response, WebError> {
    let session = visitor.signed_in()?.clone();
    // Another site's post is refused before a byte of it is read.
    visitor.check_origin(&headers)?;
    let refuse = |status: StatusCode, problem: String| {
        let (app, visitor) = (&app, &visitor);
        async move { page(app, visitor, status, problem).await }
    };
    let mut fields = Fields::default();
    let field = loop {
        let next = multipart.next_field().await.map_err(|e| {
            WebError::new(
                StatusCode::BAD_REQUEST,
                format!("the form did not arrive whole: {e}"),
                &visitor.chrome("Submit a job"),
            )
        })?;
        let Some(field) = next else {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "no file came with the form: choose a job file or a source tarball".into(),
            )
            .await;
        };
        let name = field.name().unwrap_or("").to_string();
        if field.file_name().is_some() {
            break (name, field);
        }
        if fields.csrf.is_none() && name != "csrf" {
            return Err(WebError::new(
                StatusCode::FORBIDDEN,
                "this form's security token must come first: load the page again and send it from there",
                &visitor.chrome("Submit a job"),
            ));
        }
        // Read a piece at a time, never past the field's cap.
        let cap = if name == "csrf" { 128 } else { MAX_SCRIPT };
        let mut field = field;
        let mut value = Vec::new();
        loop {
            let piece = field.chunk().await.map_err(|e| {
                WebError::new(
                    StatusCode::BAD_REQUEST,
                    format!("the form did not arrive whole: {e}"),
                    &visitor.chrome("Submit a job"),
                )
            })?;
            let Some(piece) = piece else { break };
            if value.len() + piece.len() > cap {
                return refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the field {name} is longer than {cap} bytes"),
                )
                .await;
            }
            value.extend_from_slice(&piece);
        }
        let value = String::from_utf8_lossy(&value).into_owned();
        fields.set(&name, value);
        if name == "csrf" {
            visitor.check_token(fields.csrf.as_deref().unwrap_or(""))?;
        }
    };
    if fields.csrf.is_none() {
        visitor.check_form(&headers, "")?;
    }
    let params = match fields.params() {
        Ok(p) => p,
        Err(problem) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, problem).await,
    };
    let owner = UserId(session.user_id as u64);
    let (field_name, field) = field;
    let file_name = field.file_name().unwrap_or("").to_string();
    let kind = match (fields.kind.as_str(), field_name.as_str()) {
        ("source", "source") => Kind::Source,
        ("file" | "", "job") => Kind::JobFile,
        _ => {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "choose either a job file, or a source tarball with a build script".into(),
            )
            .await;
        }
    };
    // What can be refused without the file is refused before it is read: the name, the
    // limits, the user's queue.
    let name_first = match kind {
        Kind::JobFile => file_name.clone(),
        Kind::Source => match job_name(&fields.name, params.image.as_deref().unwrap_or("i0")) {
            Ok(n) => n,
            Err(problem) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, problem).await,
        },
    };
    if let Err(r) = crate::api_jobs::precheck(&app, owner, &name_first, &params).await {
        let status = StatusCode::from_u16(r.0.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
        return refuse(status, r.0.message).await;
    }
    // The part is spooled to a file first (it borrows the request), within the server's cap.
    let max = app.settings.max_job_size;
    let spooled = match spool(field.map_err(std::io::Error::other), max).await {
        Ok(f) => f,
        Err(problem) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, problem).await,
    };
    let (name, file) = match kind {
        Kind::JobFile => (file_name, spooled),
        Kind::Source => {
            let image = params.image.clone().unwrap_or_else(|| "i0".into());
            let name = match job_name(&fields.name, &image) {
                Ok(n) => n,
                Err(problem) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, problem).await,
            };
            match pack_source(&file_name, &fields.script, spooled).await {
                Ok(b) => (name, b),
                Err(problem) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, problem).await,
            }
        }
    };
    let len = file.as_file().metadata().map(|m| m.len()).ok();
    let opened = file.reopen().map_err(|e| {
        WebError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
            &visitor.chrome("Submit a job"),
        )
    })?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(
        tokio::fs::File::from_std(opened),
    ));
    let stored = crate::api_jobs::submit_job(&app, owner, &name, &params, len, body).await;
    match stored {
        Ok(job) => {
            tracing::info!(
                "job {} ({}) submitted on the website by {}",
                job.facts.id,
                job.facts.name,
                session.user
            );
            Ok(Redirect::to(&visitor.link(&format!("/jobs/{}", job.facts.id))).into_response())
        }
        Err(r) => {
            let status = StatusCode::from_u16(r.0.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
            refuse(status, r.0.message).await
        }
    }
}

/// The job file's name for a packed source: `NAME_IMAGE.tar.xz`, NAME as typed (letters,
/// digits, `-` and `.`; default `build`).
fn job_name(name: &str, image: &str) -> Result<String, String> {
    let name = match name.trim() {
        "" => "build",
        n => n,
    };
    if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
    {
        return Err(format!(
            "the job's name {:?} may hold only letters, digits, '-' and '.' (at most 64)",
            excerpt(name)
        ));
    }
    let file = format!("{name}_{image}.tar.xz");
    construir_contract::jobname::parse_job_name(&file)
        .map(|_| file)
        .map_err(|e| e.to_string())
}

/// How the VM unpacks a source tarball, by its name.
fn unpack_flags(file_name: &str) -> Option<(&'static str, &'static str)> {
    let lower = file_name.to_ascii_lowercase();
    [
        (".tar.gz", "source.tar.gz", "-xzf"),
        (".tgz", "source.tar.gz", "-xzf"),
        (".tar.xz", "source.tar.xz", "-xJf"),
        (".txz", "source.tar.xz", "-xJf"),
        (".tar", "source.tar", "-xf"),
    ]
    .into_iter()
    .find(|(ext, _, _)| lower.ends_with(ext))
    .map(|(_, name, flags)| (name, flags))
}

/// The `opt/job/construir` of a packed source: the tarball as uploaded is unpacked into
/// /opt/job/src in the VM, and the build script runs there (`construir_contract::source_job`,
/// the layout `construir-pack --script` makes too).
fn wrapper(source: &str, flags: &str) -> String {
    construir_contract::source_job::wrapper(
        "construir-server's submit form",
        Some(&format!("tar {flags} /opt/job/{source} -C /{SOURCE_DIR}")),
    )
}

/// What the form's file is.
enum Kind {
    JobFile,
    Source,
}

/// Streams a form's file to a temporary file (removed when dropped), refusing it past `max`.
async fn spool(
    stream: impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin,
    max: u64,
) -> Result<tempfile::NamedTempFile, String> {
    let upload = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    let mut out = tokio::fs::File::from_std(upload.reopen().map_err(|e| e.to_string())?);
    let mut reader = tokio_util::io::StreamReader::new(stream);
    let mut limited = tokio::io::AsyncReadExt::take(&mut reader, max + 1);
    let n = tokio::io::copy(&mut limited, &mut out)
        .await
        .map_err(|e| format!("the upload was cut short: {e}"))?;
    if n > max {
        return Err(format!(
            "the file is larger than this server takes ({max} bytes)"
        ));
    }
    Ok(upload)
}

/// Packs the spooled tarball with the script into a job archive (an xz tar); its file.
async fn pack_source(
    file_name: &str,
    script: &str,
    upload: tempfile::NamedTempFile,
) -> Result<tempfile::NamedTempFile, String> {
    let Some((source, flags)) = unpack_flags(file_name) else {
        return Err(format!(
            "the source {:?} is not a .tar, .tar.gz, .tgz, .tar.xz or .txz file",
            excerpt(file_name)
        ));
    };
    if script.trim().is_empty() {
        return Err("a source tarball needs a build script to run".into());
    }
    let script = script.replace("\r\n", "\n");
    let wrapper = wrapper(source, flags);
    let source = source.to_string();
    tokio::task::spawn_blocking(move || build_job(upload, &source, &wrapper, &script))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("packing the job: {e}"))
}

fn build_job(
    upload: tempfile::NamedTempFile,
    source: &str,
    wrapper: &str,
    script: &str,
) -> std::io::Result<tempfile::NamedTempFile> {
    let built = tempfile::NamedTempFile::new()?;
    let xz = xz2::write::XzEncoder::new(built.reopen()?, 1);
    let mut tar = tar::Builder::new(xz);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut add = |path: &str, mode: u32, size: u64, data: &mut dyn std::io::Read| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_size(size);
        h.set_cksum();
        tar.append_data(&mut h, path, data)
    };
    add(
        "opt/job/construir",
        0o755,
        wrapper.len() as u64,
        &mut wrapper.as_bytes(),
    )?;
    add(
        BUILD_SCRIPT,
        0o755,
        script.len() as u64,
        &mut script.as_bytes(),
    )?;
    let mut file = upload.reopen()?;
    let size = file.metadata()?.len();
    add(&format!("opt/job/{source}"), 0o644, size, &mut file)?;
    tar.into_inner()?.finish()?;
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_names_and_tarballs_are_checked() {
        assert_eq!(job_name("", "i0").unwrap(), "build_i0.tar.xz");
        assert_eq!(job_name("lua-5.4", "i0").unwrap(), "lua-5.4_i0.tar.xz");
        assert!(job_name("a b", "i0").is_err());
        assert!(job_name("<x>", "i0").is_err());
        assert_eq!(unpack_flags("x.TGZ"), Some(("source.tar.gz", "-xzf")));
        assert_eq!(unpack_flags("x.tar.xz"), Some(("source.tar.xz", "-xJf")));
        assert_eq!(unpack_flags("x.zip"), None);
    }

    #[test]
    fn a_packed_source_is_a_job_that_unpacks_it_in_the_vm() {
        let mut upload = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut upload, b"not really a tarball").unwrap();
        let built = build_job(
            upload,
            "source.tar.gz",
            &wrapper("source.tar.gz", "-xzf"),
            "make\n",
        )
        .unwrap();
        let bytes = std::fs::read(built.path()).unwrap();
        let read = |path: &str| {
            construir_contract::archive::read_file(&bytes[..], path, 1 << 20)
                .unwrap()
                .unwrap()
        };
        let script = String::from_utf8(read("opt/job/construir")).unwrap();
        assert!(
            script.contains("tar -xzf /opt/job/source.tar.gz -C /opt/job/src"),
            "{script}"
        );
        assert_eq!(read("opt/job/build.sh"), b"make\n");
        assert_eq!(read("opt/job/source.tar.gz"), b"not really a tarball");
    }
}
