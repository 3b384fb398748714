//! Versions as toolchains print them and as lock files and manifests ask for them, compared
//! numerically: enough to say "this needs rustc 1.88, the image has 1.85" before a job is
//! packed to fail in the VM.

/// A version's numbers: `1.85.1` → `[1, 85, 1]`; missing parts compare as 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(pub Vec<u64>);

impl Version {
    /// A plain dotted version (`1.85`, `v20.19.2`, `go1.24.4`): the leading letters are
    /// skipped, the numbers end at the first character that is neither a digit nor a dot
    /// (`1.85.1+dfsg1` → 1.85.1).
    pub fn parse(text: &str) -> Option<Version> {
        let digits = text
            .trim()
            .trim_start_matches(|c: char| c.is_ascii_alphabetic());
        let end = digits
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(digits.len());
        let numbers: Option<Vec<u64>> = digits[..end]
            .split('.')
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().ok())
            .collect();
        numbers.filter(|n| !n.is_empty()).map(Version)
    }

    /// The first version in a tool's own line (`rustc 1.85.1 (4eb161250 2025-03-15)`,
    /// `go version go1.24.4 linux/amd64`, `Python 3.13.5`, `v20.19.2`): the first word that
    /// holds a dotted number.
    pub fn in_text(text: &str) -> Option<Version> {
        text.split_whitespace()
            .filter(|w| w.contains('.'))
            .find_map(Version::parse)
    }

    fn part(&self, i: usize) -> u64 {
        self.0.get(i).copied().unwrap_or(0)
    }

    /// Numeric order over the longer of the two, missing parts as 0.
    pub fn cmp_to(&self, other: &Version) -> std::cmp::Ordering {
        let n = self.0.len().max(other.0.len());
        (0..n)
            .map(|i| self.part(i).cmp(&other.part(i)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    }

    pub fn at_least(&self, other: &Version) -> bool {
        self.cmp_to(other).is_ge()
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

/// Whether `have` satisfies an npm-style range (`package.json`'s `engines.node`): alternatives
/// joined by `||`, each a set of comparators (`>=18`, `<21`, `^20.3`, `~20.1`, `20.x`, `20`,
/// `>=14 <=22`, `16 - 22`). `None` when the range has a form this does not know (it is then
/// reported as unchecked, not guessed).
pub fn satisfies_npm_range(have: &Version, range: &str) -> Option<bool> {
    let range = range.trim();
    if range.is_empty() || range == "*" || range == "x" {
        return Some(true);
    }
    let mut any = false;
    for alternative in range.split("||") {
        let words: Vec<&str> = alternative.split_whitespace().collect();
        let ok = if let [low, "-", high] = words[..] {
            have.at_least(&Version::parse(low)?) && upto_inclusive(have, high)?
        } else {
            let mut all = true;
            for w in joined_operators(&words) {
                all &= comparator(have, &w)?;
            }
            all
        };
        any |= ok;
    }
    Some(any)
}

/// `>= 18` written with a space is the same comparator as `>=18`.
fn joined_operators(words: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut pending = String::new();
    for w in words {
        if w.chars().all(|c| "<>=^~".contains(c)) {
            pending.push_str(w);
        } else {
            out.push(format!("{pending}{w}"));
            pending.clear();
        }
    }
    out
}

/// `<= 22.x` or `<=22.3`: a partial version allows every version it stands for.
fn upto_inclusive(have: &Version, high: &str) -> Option<bool> {
    let (v, given) = partial(high)?;
    let prefix = Version(have.0.iter().take(given).copied().collect());
    Some(prefix.cmp_to(&v).is_le())
}

/// A version with `x`/`*` parts or missing parts: its numbers and how many were given.
fn partial(text: &str) -> Option<(Version, usize)> {
    let text = text.trim_start_matches(['v', '=']);
    let mut numbers = Vec::new();
    for p in text.split('.') {
        if p == "x" || p == "X" || p == "*" {
            break;
        }
        numbers.push(p.parse::<u64>().ok()?);
    }
    if numbers.is_empty() {
        return None;
    }
    let given = numbers.len();
    Some((Version(numbers), given))
}

fn comparator(have: &Version, c: &str) -> Option<bool> {
    let op_len = c.find(|ch: char| !"<>=^~".contains(ch)).unwrap_or(c.len());
    let (op, rest) = c.split_at(op_len);
    let (v, given) = partial(rest)?;
    let prefix = |n: usize| Version(have.0.iter().take(n).copied().collect());
    Some(match op {
        ">=" => have.at_least(&v),
        ">" => prefix(given).cmp_to(&v).is_gt(),
        "<" => have.cmp_to(&v).is_lt(),
        "<=" => prefix(given).cmp_to(&v).is_le(),
        "" | "=" => prefix(given) == v,
        "^" => {
            // The leftmost non-zero part stays, the rest may grow.
            let keep = v.0.iter().position(|&n| n != 0).map_or(given, |i| i + 1);
            have.at_least(&v) && prefix(keep.min(given)) == Version(v.0[..keep.min(given)].to_vec())
        }
        "~" => {
            let keep = if given >= 2 { 2 } else { 1 };
            have.at_least(&v) && prefix(keep) == Version(v.0[..keep].to_vec())
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn versions_come_out_of_what_tools_print() {
        let cases = [
            ("rustc 1.85.1 (4eb161250 2025-03-15)", "1.85.1"),
            ("go version go1.24.4 linux/amd64", "1.24.4"),
            ("Python 3.13.5", "3.13.5"),
            ("v20.19.2", "20.19.2"),
            ("cargo 1.85.1 (d73d2caf9 2024-12-31)", "1.85.1"),
            ("13.2", "13.2"),
        ];
        for (text, want) in cases {
            assert_eq!(Version::in_text(text).unwrap().to_string(), want, "{text}");
        }
        assert_eq!(v("1.85.1+dfsg1").to_string(), "1.85.1");
        assert!(Version::in_text("no version here").is_none());
        assert!(Version::parse("").is_none());
    }

    #[test]
    fn versions_compare_by_number_with_missing_parts_as_zero() {
        assert!(v("1.85.1").at_least(&v("1.85")));
        assert!(v("1.85").at_least(&v("1.85.0")));
        assert!(!v("1.85").at_least(&v("1.85.1")));
        assert!(v("1.100").at_least(&v("1.99")));
        assert!(!v("1.9").at_least(&v("1.10")));
    }

    #[test]
    fn npm_ranges_as_engines_write_them() {
        let node = v("20.19.2");
        let yes = [
            ">=18",
            ">= 18",
            ">=18.0.0",
            "^20",
            "^20.3.0",
            "~20.19",
            "20.x",
            "20",
            "16 - 22",
            ">=14 <21",
            "<=20",
            "^18 || ^20",
            "*",
            "",
            ">=20.19.2",
            "<= 20.x",
            "=20.19.2",
        ];
        for r in yes {
            assert_eq!(satisfies_npm_range(&node, r), Some(true), "{r}");
        }
        let no = [
            ">=22",
            "^18",
            "~20.18",
            "21.x",
            "<20",
            ">20",
            ">=14 <20",
            "^18 || ^22",
            "22 - 24",
            "<=19",
            "~20.20",
        ];
        for r in no {
            assert_eq!(satisfies_npm_range(&node, r), Some(false), "{r}");
        }
        assert_eq!(satisfies_npm_range(&v("0.3.5"), "^0.3.1"), Some(true));
        assert_eq!(satisfies_npm_range(&v("0.4.0"), "^0.3.1"), Some(false));
        assert_eq!(satisfies_npm_range(&node, "latest"), None);
        assert_eq!(satisfies_npm_range(&node, ">=lts"), None);
    }
}
