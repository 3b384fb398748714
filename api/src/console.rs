//! A job's console, made safe to show to a person: every byte of it is the job's, so a stranger's.
//!
//! [`Renderer`] turns console bytes into runs of text with a style ([`Segment`]), fed piece by
//! piece as they arrive (an escape sequence or a UTF-8 character split between two pieces is
//! carried over). ANSI SGR colours and bold become a style from a closed set of class names;
//! every other escape sequence (cursor moves, titles, hyperlinks, …) is dropped; control
//! characters are shown as visible symbols (U+2400 and on), and so are the characters that
//! reorder text (bidirectional overrides, "Trojan Source"), so what a page shows is what the
//! console held. Bytes that are not UTF-8 show as U+FFFD. The text is plain text: whoever puts
//! it into HTML escapes it (the website's templates, or the browser's `textContent`).

use serde::Serialize;

/// A run of console text in one style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// Space-separated class names from [`CLASSES`], or empty.
    pub class: &'static str,
    pub text: String,
}

/// Every class a segment may carry: `b` (bold), `fN` (foreground colour N, 0 to 15).
pub const CLASSES: [&str; 34] = [
    "", "b", "f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10", "f11", "f12",
    "f13", "f14", "f15", "b f0", "b f1", "b f2", "b f3", "b f4", "b f5", "b f6", "b f7", "b f8",
    "b f9", "b f10", "b f11", "b f12", "b f13", "b f14", "b f15",
];

/// The longest escape sequence kept in memory: a longer one is dropped whole (a job cannot make
/// the renderer buffer without end).
const MAX_SEQUENCE: usize = 256;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Style {
    bold: bool,
    colour: Option<u8>,
}

impl Style {
    fn class(self) -> &'static str {
        let i = match (self.bold, self.colour) {
            (false, None) => 0,
            (true, None) => 1,
            (false, Some(c)) => 2 + usize::from(c),
            (true, Some(c)) => 18 + usize::from(c),
        };
        CLASSES[i]
    }

    /// Applies an SGR sequence's parameters (`1;31`); unknown ones are ignored.
    fn apply(&mut self, params: &[u8]) {
        let text = String::from_utf8_lossy(params);
        let mut numbers = text
            .split([';', ':'])
            .map(|p| p.parse::<u16>().unwrap_or(0));
        let mut any = false;
        while let Some(n) = numbers.next() {
            any = true;
            match n {
                0 => *self = Style::default(),
                1 => self.bold = true,
                22 => self.bold = false,
                30..=37 => self.colour = Some((n - 30) as u8),
                90..=97 => self.colour = Some((n - 90 + 8) as u8),
                39 => self.colour = None,
                // 256 colours and true colour: their arguments are skipped, the colour kept as
                // it was (a closed set of classes has no room for them).
                38 | 48 => match numbers.next() {
                    Some(5) => {
                        numbers.next();
                    }
                    Some(2) => {
                        numbers.nth(2);
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        if !any {
            *self = Style::default();
        }
    }
}

#[derive(Debug, Clone, Default)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Start,
    /// After ESC and intermediate bytes (`ESC ( B`), until a final byte.
    Intermediate(usize),
    /// In `ESC [`, with its parameter bytes so far.
    Csi(Vec<u8>),
    /// In `ESC ]` (or another string sequence), until BEL or `ESC \`.
    Text { after_esc: bool, len: usize },
}

/// Renders a console fed in pieces.
#[derive(Debug, Clone, Default)]
pub struct Renderer {
    style: Style,
    escape: Escape,
    /// The start of a UTF-8 character the last piece ended in.
    partial: Vec<u8>,
    /// A CR that may be the first half of CR LF.
    cr: bool,
}

impl Renderer {
    pub fn new() -> Self {
        Renderer::default()
    }

    /// The segments `piece` adds, after what was fed before.
    pub fn feed(&mut self, piece: &[u8]) -> Vec<Segment> {
        let mut out = Out::default();
        let mut bytes = std::mem::take(&mut self.partial);
        bytes.extend_from_slice(piece);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.chars(text, &mut out);
                    rest = &[];
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    // `good` is valid UTF-8: from_utf8 said so.
                    self.chars(std::str::from_utf8(good).unwrap_or_default(), &mut out);
                    match e.error_len() {
                        Some(n) => {
                            self.chars("\u{fffd}", &mut out);
                            rest = &bad[n..];
                        }
                        None => {
                            // A character cut off at the piece's end: kept for the next one.
                            self.partial = bad.to_vec();
                            rest = &[];
                        }
                    }
                }
            }
        }
        out.segments
    }

    /// What is left when the console ends: a cut-off character as U+FFFD.
    pub fn finish(&mut self) -> Vec<Segment> {
        let mut out = Out::default();
        if !std::mem::take(&mut self.partial).is_empty() {
            self.chars("\u{fffd}", &mut out);
        }
        out.segments
    }

    fn chars(&mut self, text: &str, out: &mut Out) {
        for c in text.chars() {
            self.char(c, out);
        }
    }

    fn char(&mut self, c: char, out: &mut Out) {
        match std::mem::take(&mut self.escape) {
            Escape::None => {}
            Escape::Start => {
                self.escape = match c {
                    '[' => Escape::Csi(Vec::new()),
                    ']' | 'P' | '_' | '^' | 'X' => Escape::Text {
                        after_esc: false,
                        len: 0,
                    },
                    '\u{20}'..='\u{2f}' => Escape::Intermediate(1),
                    // Any other: a two-character sequence, dropped.
                    _ => Escape::None,
                };
                return;
            }
            Escape::Intermediate(n) => {
                if matches!(c, '\u{20}'..='\u{2f}') && n < MAX_SEQUENCE {
                    self.escape = Escape::Intermediate(n + 1);
                }
                return;
            }
            Escape::Csi(mut params) => {
                match c {
                    'm' => self.style.apply(&params),
                    // Any other final byte: a sequence that is not SGR, dropped.
                    '\u{40}'..='\u{7e}' => {}
                    '\u{20}'..='\u{3f}' if params.len() < MAX_SEQUENCE => {
                        params.push(c as u8);
                        self.escape = Escape::Csi(params);
                    }
                    // Too long, or not a CSI byte: the sequence is dropped.
                    _ => {}
                }
                return;
            }
            Escape::Text { after_esc, len } => {
                let done = c == '\u{7}' || (after_esc && c == '\\') || len >= MAX_SEQUENCE;
                if !done {
                    self.escape = Escape::Text {
                        after_esc: c == '\u{1b}',
                        len: len + 1,
                    };
                }
                return;
            }
        }
        if std::mem::take(&mut self.cr) && c != '\n' {
            // A lone CR (a progress bar's redraw) starts a new line on a page.
            out.push(self.style.class(), '\n');
        }
        match c {
            '\u{1b}' => self.escape = Escape::Start,
            '\r' => self.cr = true,
            '\n' | '\t' => out.push(self.style.class(), c),
            // C0 controls as their control pictures (U+2400..), DEL as U+2421.
            '\u{0}'..='\u{1f}' => out.push(
                self.style.class(),
                char::from_u32(0x2400 + c as u32).unwrap_or('\u{fffd}'),
            ),
            '\u{7f}' => out.push(self.style.class(), '\u{2421}'),
            // C1 controls (a CSI of their own among them): shown, never obeyed.
            '\u{80}'..='\u{9f}' => out.push(self.style.class(), '\u{fffd}'),
            // What reorders text: shown as a visible mark.
            '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{061c}' => out.push(self.style.class(), '\u{fffd}'),
            _ => out.push(self.style.class(), c),
        }
    }
}

#[derive(Default)]
struct Out {
    segments: Vec<Segment>,
}

impl Out {
    fn push(&mut self, class: &'static str, c: char) {
        match self.segments.last_mut() {
            Some(s) if s.class == class => s.text.push(c),
            _ => self.segments.push(Segment {
                class,
                text: c.to_string(),
            }),
        }
    }
}

/// The whole of `bytes`, rendered.
pub fn render(bytes: &[u8]) -> Vec<Segment> {
    let mut r = Renderer::new();
    let mut out = r.feed(bytes);
    out.extend(r.finish());
    out
}

/// The text of `segments`, styles dropped.
pub fn plain(segments: &[Segment]) -> String {
    segments.iter().map(|s| s.text.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(class: &'static str, text: &str) -> Segment {
        Segment {
            class,
            text: text.into(),
        }
    }

    #[test]
    fn colours_become_classes_and_other_sequences_are_dropped() {
        assert_eq!(
            render(b"plain \x1b[1;31mred bold\x1b[0m \x1b[92mgreen\x1b[39m end"),
            [
                seg("", "plain "),
                seg("b f1", "red bold"),
                seg("", " "),
                seg("f10", "green"),
                seg("", " end")
            ]
        );
        // Cursor moves, clears, a title, a hyperlink: gone, their text kept.
        assert_eq!(
            plain(&render(
                b"a\x1b[2J\x1b[10;5Hb\x1b]0;title\x07c\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\d\x1b(Be"
            )),
            "abclinkde"
        );
        // 256-colour and true-colour arguments are skipped, not read as other codes.
        assert_eq!(render(b"\x1b[38;5;1mx"), [seg("", "x")]);
        assert_eq!(render(b"\x1b[38;2;1;2;3;1mx"), [seg("b", "x")]);
        assert_eq!(render(b"\x1b[1m\x1b[mx"), [seg("", "x")]);
    }

    #[test]
    fn controls_and_reordering_characters_are_shown_not_obeyed() {
        assert_eq!(
            plain(&render(b"a\x00b\x07c\x08d\x7fe\tf\r\ng\rh")),
            "a\u{2400}b\u{2407}c\u{2408}d\u{2421}e\tf\ng\nh"
        );
        let bidi = "x\u{202e}gnp.exe\u{2066}y".as_bytes();
        assert_eq!(plain(&render(bidi)), "x\u{fffd}gnp.exe\u{fffd}y");
        // C1 controls (U+009B is a CSI of its own) and bytes that are not UTF-8.
        assert_eq!(plain(&render("a\u{9b}31mb".as_bytes())), "a\u{fffd}31mb");
        assert_eq!(plain(&render(b"a\xffb\xc3")), "a\u{fffd}b\u{fffd}");
        // HTML is text here: escaping is the page's job, and nothing is removed from it.
        assert_eq!(
            plain(&render(b"<script>alert(1)</script>")),
            "<script>alert(1)</script>"
        );
    }

    #[test]
    fn pieces_split_anywhere_render_as_the_whole() {
        let console = "é \x1b[1;34mblue\x1b[0m ✓\r\n\x1b]0;t\x07done \u{1F600}".as_bytes();
        let whole = render(console);
        for cut in 0..console.len() {
            let mut r = Renderer::new();
            let mut out = r.feed(&console[..cut]);
            out.extend(r.feed(&console[cut..]));
            out.extend(r.finish());
            assert_eq!(plain(&out), plain(&whole), "cut at {cut}");
            let styled: String = out
                .iter()
                .filter(|s| !s.class.is_empty())
                .map(|s| format!("{}:{}", s.class, s.text))
                .collect();
            // A cut inside the styled run splits it in two segments of one style.
            assert_eq!(styled.replace("b f4:", ""), "blue", "cut at {cut}");
            assert!(out.iter().all(|s| ["", "b f4"].contains(&s.class)));
        }
    }

    #[test]
    fn an_endless_escape_sequence_is_dropped_within_bounds() {
        let mut long = b"\x1b[".to_vec();
        long.extend(std::iter::repeat_n(b'1', 10_000));
        long.extend_from_slice(b"mafter");
        // The sequence ends at its cap; the bytes after it are text.
        let text = plain(&render(&long));
        assert!(text.ends_with("mafter"), "{text:.40}");
        assert!(text.len() < 10_000);
        let mut title = b"\x1b]0;".to_vec();
        title.extend(std::iter::repeat_n(b'x', 10_000));
        assert!(plain(&render(&title)).len() < 10_000);
        for class in render(b"\x1b[1;97mx\x1b[35my").iter().map(|s| s.class) {
            assert!(CLASSES.contains(&class));
        }
    }
}
