//! What a job chose (its name, the reasons that quote it, its console) is shown with whatever a
//! terminal would act on made visible: a job's name is a stranger's text, and an escape sequence
//! in it could retitle the window, rewrite the screen or hide a line.

use std::borrow::Cow;
use std::fmt::Write as _;

pub use construir_contract::text::{is_bidi, printable, push_escaped};

/// Valid JSON text made safe for a terminal without changing what it means: DEL, the C1
/// controls and the bidirectional controls, which JSON may carry raw in strings, become `\uNNNN`
/// escapes. Outside strings JSON has only ASCII tokens and whitespace, so every such character is
/// inside a string, and its escape is the same string. Tabs and line ends stay: in valid JSON
/// they are whitespace between tokens (in a string they must be escaped already).
pub fn json_for_terminal(json: &str) -> Cow<'_, str> {
    let whitespace = |c: char| matches!(c, '\n' | '\t' | '\r');
    let special = |c: char| (c.is_control() && !whitespace(c)) || is_bidi(c);
    if !json.chars().any(special) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if special(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Console bytes as they arrive, in pieces, made safe for a terminal: lines and tabs kept, a
/// `\r\n` read as a line end (serial consoles send them), every other control character, bidi
/// control and byte that is not UTF-8 made visible. A character split between two pieces is
/// held until the rest comes. Backslashes are left alone: a console is full of them (C strings,
/// paths), and it is no name one could mistake.
#[derive(Debug, Default)]
pub struct ConsoleFilter {
    pending: Vec<u8>,
}

impl ConsoleFilter {
    /// The text for `bytes`, keeping back at most an unfinished character or a trailing `\r`.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut data = std::mem::take(&mut self.pending);
        data.extend_from_slice(bytes);
        let mut out = String::with_capacity(data.len());
        let mut rest = &data[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.pending = self.push_text(&mut out, text, true).into_bytes();
                    return out;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    // `valid_up_to` says `good` is UTF-8.
                    let text = std::str::from_utf8(good).unwrap_or_default();
                    let held = self.push_text(&mut out, text, false);
                    debug_assert!(held.is_empty());
                    match e.error_len() {
                        Some(n) => {
                            for b in &bad[..n] {
                                let _ = write!(out, "\\x{b:02x}");
                            }
                            rest = &bad[n..];
                        }
                        // An unfinished character at the end: wait for the rest.
                        None => {
                            self.pending = bad.to_vec();
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// What is still held, once nothing more will come.
    pub fn finish(&mut self) -> String {
        let held = std::mem::take(&mut self.pending);
        let mut out = String::new();
        for b in held {
            let _ = write!(out, "\\x{b:02x}");
        }
        out
    }

    /// Appends `text` to `out`; returns a trailing `\r` to hold when `at_end` (a `\n` may follow
    /// in the next piece).
    fn push_text(&self, out: &mut String, text: &str, at_end: bool) -> String {
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\n' | '\t' => out.push(c),
                '\r' if chars.peek() == Some(&'\n') => {}
                '\r' if at_end && chars.peek().is_none() => return "\r".into(),
                c if c.is_control() || is_bidi(c) => push_escaped(out, c),
                c => out.push(c),
            }
        }
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_its_meaning_and_loses_its_controls() {
        let value = serde_json::json!({"name": "a\u{9b}31m\u{202e}b\x7f\x1b", "n": 1});
        let text = serde_json::to_string_pretty(&value).unwrap();
        let safe = json_for_terminal(&text);
        assert!(!safe.chars().any(|c| c.is_control() && c != '\n'), "{safe}");
        assert!(
            safe.contains("\\u009b") && safe.contains("\\u202e"),
            "{safe}"
        );
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, value);
        assert!(matches!(
            json_for_terminal("{\n  \"a\": 1\n}"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn the_console_filter_keeps_lines_and_shows_escapes_across_pieces() {
        let mut f = ConsoleFilter::default();
        let mut all = String::new();
        // "ü" split between pieces, "\r\n" split too, an escape sequence, a stray byte.
        for piece in [
            &b"make\r\nok \xc3"[..],
            b"\xbc\r",
            b"\n\x1b[2Jhidden\tx\r y",
            b" \xff\xfe done\n",
        ] {
            all.push_str(&f.push(piece));
        }
        all.push_str(&f.finish());
        assert_eq!(
            all,
            "make\nok ü\n\\x1b[2Jhidden\tx\\x0d y \\xff\\xfe done\n"
        );
        // An unfinished character at the very end is shown, not lost.
        let mut f = ConsoleFilter::default();
        assert_eq!(f.push(b"a\xe4\xb8"), "a");
        assert_eq!(f.finish(), "\\xe4\\xb8");
        assert_eq!(
            ConsoleFilter::default().push("c\\n \u{202e}".as_bytes()),
            "c\\n \\u{202e}"
        );
    }
}
