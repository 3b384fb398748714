//! How text a job chose (its name, a file name in its output, an error quoting them, its console)
//! is shown: whatever a terminal would act on made visible. A job's name is a stranger's text,
//! and an escape sequence in it could retitle the window, rewrite the screen or hide a line.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Bidirectional marks, embeddings, overrides and isolates: they make text display in another
/// order than it reads.
pub fn is_bidi(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// Appends `c` as `\xNN` (below U+0100) or `\u{NNNN}`.
pub fn push_escaped(out: &mut String, c: char) {
    if (c as u32) < 0x100 {
        let _ = write!(out, "\\x{:02x}", c as u32);
    } else {
        let _ = write!(out, "\\u{{{:04x}}}", c as u32);
    }
}

/// `text` with control characters (escape sequences start with one) as `\xNN` and bidirectional
/// controls as `\u{NNNN}`. Backslashes are doubled, so an escape cannot be faked.
pub fn printable(text: &str) -> Cow<'_, str> {
    let special = |c: char| c == '\\' || c.is_control() || is_bidi(c);
    if !text.chars().any(special) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if !special(c) => out.push(c),
            c => push_escaped(&mut out, c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_a_terminal_would_act_on() {
        assert!(matches!(printable("src/main.c ü 中"), Cow::Borrowed(_)));
        assert_eq!(printable("a\x1b]0;owned\x07b"), "a\\x1b]0;owned\\x07b");
        assert_eq!(printable("x\x1b[2J\ry\n\t"), "x\\x1b[2J\\x0dy\\x0a\\x09");
        assert_eq!(printable("c1\u{9b}31m del\x7f"), "c1\\x9b31m del\\x7f");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        // A literal backslash sequence in a name cannot pass for an escaped byte.
        assert_eq!(printable("a\\x1b"), "a\\\\x1b");
    }
}
