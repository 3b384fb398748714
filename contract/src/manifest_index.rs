//! Image index syntax, shared by manifests and job names.

/// Whether `index` looks like an image index: a lower-case letter then 1–7 digits (`i0`, `t12`).
pub fn valid_index(index: &str) -> bool {
    let mut chars = index.chars();
    matches!(chars.next(), Some('a'..='z'))
        && index.len() >= 2
        && index.len() <= 8
        && chars.all(|c| c.is_ascii_digit())
}
