//! Job file names: `NAME_INDEX.tar.xz` (the seed format), where INDEX names the build image
//! (`i0`, `t0`, …). `.tar.gz`, `.tgz`, `.tar.zst` and `.tar` are accepted too, since the guest
//! unpacks all of them.

use crate::manifest_index::valid_index;

/// The extensions a job file may have.
pub const JOB_EXTENSIONS: &[&str] = &[".tar.xz", ".tar.gz", ".tgz", ".tar.zst", ".tar"];

/// A job file name that does not follow `NAME_INDEX.tar.xz`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job file name {name:?} {reason} (expected NAME_INDEX.tar.xz, like hello_i0.tar.xz)")]
pub struct JobNameError {
    pub name: String,
    pub reason: &'static str,
}

/// A parsed job file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobName {
    /// The part before `_INDEX`.
    pub name: String,
    /// The image index.
    pub image: String,
}

/// Parses a job file name (a file name, not a path).
pub fn parse_job_name(file_name: &str) -> Result<JobName, JobNameError> {
    let err = |reason| JobNameError {
        name: file_name.to_string(),
        reason,
    };
    if file_name.contains('/') || file_name.starts_with('.') {
        return Err(err("must be a plain file name"));
    }
    // Names end up in logs, records and terminals: no escape sequences, no line breaks.
    if file_name.chars().any(char::is_control) {
        return Err(err("holds control characters"));
    }
    let stem = JOB_EXTENSIONS
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))
        .ok_or_else(|| err("has no .tar.xz extension"))?;
    let (name, image) = stem
        .rsplit_once('_')
        .ok_or_else(|| err("has no _INDEX before the extension"))?;
    if name.is_empty() {
        return Err(err("has an empty name before _INDEX"));
    }
    if !valid_index(image) {
        return Err(err(
            "has no valid image index (a letter and a number, like i0)",
        ));
    }
    Ok(JobName {
        name: name.to_string(),
        image: image.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_names_parse() {
        let j = parse_job_name("hello_i0.tar.xz").unwrap();
        assert_eq!((j.name.as_str(), j.image.as_str()), ("hello", "i0"));
        let j = parse_job_name("my_big_job_t12.tar.zst").unwrap();
        assert_eq!((j.name.as_str(), j.image.as_str()), ("my_big_job", "t12"));
        assert_eq!(parse_job_name("x_i1.tgz").unwrap().image, "i1");
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        for bad in [
            "hello.tar.xz",
            "hello_i0.zip",
            "_i0.tar.xz",
            "hello_I0.tar.xz",
            "hello_ix.tar.xz",
            "../a_i0.tar.xz",
            ".hidden_i0.tar.xz",
            "red\u{1b}[31m_i0.tar.xz",
            "two\nlines_i0.tar.xz",
            "hello_i0.tar.xz.part",
            "",
        ] {
            let e = parse_job_name(bad).unwrap_err();
            assert!(
                e.to_string().contains("expected NAME_INDEX.tar.xz"),
                "{bad}: {e}"
            );
        }
    }
}
