//! A hand-written matcher for the GPT-4 split pattern (numbers in groups of up to `max_digits`):
//!
//! ```text
//! '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+
//! ```
//!
//! fancy-regex runs this pattern through its backtracking VM at ~3 MB/s per core, which made
//! splitting ~80% of training time on the offline corpus; this matcher gives the same chunks
//! (checked against fancy-regex in the tests below) at a small fraction of the cost. Character
//! classes are the regex crate's own Unicode tables (\p{L}, \p{N}, \s = White_Space), so both
//! paths agree on every code point. Not for: any other pattern (those go to fancy-regex).

use regex_syntax::hir::{Class as HirClass, HirKind};
use std::sync::OnceLock;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

/// Classes of all code points below 0x10000 (one byte each), and sorted ranges above.
struct Tables {
    bmp: Vec<Class>,
    astral: Vec<(char, char, Class)>,
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut bmp = vec![Class::Other; 0x10000];
        let mut astral = Vec::new();
        for (pattern, class) in [
            (r"\p{L}", Class::Letter),
            (r"\p{N}", Class::Number),
            (r"\s", Class::Space),
        ] {
            let hir = regex_syntax::parse(pattern).expect("Unicode class parses");
            let HirKind::Class(HirClass::Unicode(ranges)) = hir.kind() else {
                unreachable!("{pattern} is a Unicode class")
            };
            for range in ranges.ranges() {
                let (start, end) = (u32::from(range.start()), u32::from(range.end()));
                for cp in start..=end.min(0xffff) {
                    bmp[cp as usize] = class;
                }
                if end > 0xffff {
                    let start = char::from_u32(start.max(0x10000)).expect("valid code point");
                    astral.push((start, range.end(), class));
                }
            }
        }
        astral.sort_unstable_by_key(|&(start, _, _)| start);
        Tables { bmp, astral }
    })
}

fn classify(tables: &Tables, c: char) -> Class {
    let cp = u32::from(c);
    if cp < 0x10000 {
        return tables.bmp[cp as usize];
    }
    match tables.astral.binary_search_by(|&(start, end, _)| {
        if end < c {
            std::cmp::Ordering::Less
        } else if start > c {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    }) {
        Ok(i) => tables.astral[i].2,
        Err(_) => Class::Other,
    }
}

/// A cursor over `text` that classifies characters.
struct Scanner<'t> {
    text: &'t str,
    tables: &'static Tables,
}

impl Scanner<'_> {
    /// The character starting at byte `i` and its class, or None at the end of the text.
    fn at(&self, i: usize) -> Option<(char, Class)> {
        let byte = *self.text.as_bytes().get(i)?;
        // Most text is ASCII: skip UTF-8 decoding for it.
        if byte.is_ascii() {
            return Some((char::from(byte), self.tables.bmp[usize::from(byte)]));
        }
        let c = self.text[i..].chars().next()?;
        Some((c, classify(self.tables, c)))
    }

    /// Byte position after the run of characters of class `class` starting at `i`
    /// (at most `limit` characters).
    fn run_end(&self, mut i: usize, class: Class, limit: usize) -> usize {
        let mut taken = 0;
        while taken < limit {
            match self.at(i) {
                Some((c, k)) if k == class => i += c.len_utf8(),
                _ => break,
            }
            taken += 1;
        }
        i
    }

    /// Alternative 1: `'(?i:[sdmt]|ll|ve|re)` after an apostrophe at `i - 1`.
    fn contraction_end(&self, i: usize) -> Option<usize> {
        let mut chars = self.text[i..].chars();
        let c1 = chars.next()?;
        // Unicode case folding makes the long s (U+017F) match `(?i)s`.
        if matches!(c1, 's' | 'S' | 'ſ' | 'd' | 'D' | 'm' | 'M' | 't' | 'T') {
            return Some(i + c1.len_utf8());
        }
        let c2 = chars.next()?.to_ascii_lowercase();
        match (c1.to_ascii_lowercase(), c2) {
            ('l', 'l') | ('v', 'e') | ('r', 'e') => Some(i + 2),
            _ => None,
        }
    }

    /// Byte position where the match starting at `p` ends (> p); `p` is before the end.
    fn match_end(&self, p: usize, max_digits: usize) -> usize {
        let (c0, k0) = self.at(p).expect("a match starts before the end of the text");
        let after0 = p + c0.len_utf8();
        if c0 == '\'' {
            if let Some(end) = self.contraction_end(after0) {
                return end;
            }
        }
        // Alternative 2: an optional non-letter, non-number, non-newline, then letters.
        if k0 == Class::Letter {
            return self.run_end(p, Class::Letter, usize::MAX);
        }
        if k0 != Class::Number && c0 != '\r' && c0 != '\n' {
            if let Some((_, Class::Letter)) = self.at(after0) {
                return self.run_end(after0, Class::Letter, usize::MAX);
            }
        }
        // Alternative 3: numbers in groups of up to max_digits.
        if k0 == Class::Number {
            return self.run_end(p, Class::Number, max_digits);
        }
        // Alternative 4: an optional space, symbols, then trailing newlines.
        let symbols_start = if c0 == ' ' { after0 } else { p };
        if let Some((_, Class::Other)) = self.at(symbols_start) {
            let mut end = self.run_end(symbols_start, Class::Other, usize::MAX);
            while matches!(self.text.as_bytes().get(end), Some(b'\r' | b'\n')) {
                end += 1;
            }
            return end;
        }
        // Only whitespace is left. Alternative 5: up to the last newline of the run.
        debug_assert_eq!(k0, Class::Space);
        let mut end = p;
        let mut after_newline = None;
        let mut last_start = p;
        while let Some((c, Class::Space)) = self.at(end) {
            last_start = end;
            end += c.len_utf8();
            if c == '\r' || c == '\n' {
                after_newline = Some(end);
            }
        }
        if let Some(after_newline) = after_newline {
            return after_newline;
        }
        // Alternative 6: the run, but leave its last character to precede the next word.
        if end == self.text.len() || last_start == p {
            end
        } else {
            last_start
        }
    }
}

/// Call `f` on each chunk of `text`, in order; the chunks tile the text.
pub fn for_each_chunk<'t>(text: &'t str, max_digits: usize, mut f: impl FnMut(&'t str)) {
    let scanner = Scanner {
        text,
        tables: tables(),
    };
    let mut p = 0;
    while p < text.len() {
        let end = scanner.match_end(p, max_digits);
        f(&text[p..end]);
        p = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::{DEFAULT_PATTERN, GPT4_PATTERN};

    fn fast(text: &str, max_digits: usize) -> Vec<&str> {
        let mut chunks = Vec::new();
        for_each_chunk(text, max_digits, |c| chunks.push(c));
        chunks
    }

    fn slow<'t>(text: &'t str, re: &fancy_regex::Regex) -> Vec<&'t str> {
        re.find_iter(text).map(|m| m.unwrap().as_str()).collect()
    }

    fn compile(pattern: &str) -> fancy_regex::Regex {
        fancy_regex::Regex::new(pattern).unwrap()
    }

    /// Characters that exercise every branch: contractions in both cases, the long s,
    /// newlines, Unicode spaces (NBSP, NEL, U+2028), 0x1C (space to Python, not to Unicode),
    /// non-ASCII letters and numbers (including astral ones), marks, symbols and emoji.
    const ALPHABET: &[char] = &[
        '\'', 's', 'S', 'ſ', 'd', 'M', 't', 'l', 'L', 'v', 'E', 'r', 'e', 'x', ' ', ' ', ' ', '\n', '\r',
        '\t', '\u{a0}', '\u{85}', '\u{2028}', '\u{1c}', '0', '7', '٣', 'Ⅻ', '½', '𝟘', 'é', 'ß', 'Σ', '中',
        '𝐀', '\u{301}', '!', '.', '-', '_', '\u{0}', '😀', '€',
    ];

    /// A small deterministic generator (xorshift64) so the comparison needs no extra crate.
    fn random_texts(count: usize) -> Vec<String> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..count)
            .map(|_| {
                let len = (next() % 24) as usize;
                (0..len)
                    .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                    .collect()
            })
            .collect()
    }

    #[test]
    fn agrees_with_fancy_regex_on_random_text() {
        let (default, gpt4) = (compile(DEFAULT_PATTERN), compile(GPT4_PATTERN));
        for text in random_texts(20_000) {
            assert_eq!(fast(&text, 2), slow(&text, &default), "{text:?}");
            assert_eq!(fast(&text, 3), slow(&text, &gpt4), "{text:?}");
        }
    }

    #[test]
    fn agrees_with_fancy_regex_on_prose_and_code() {
        let text = "He said: \"we'll see\"; it's 2025-11-22, THEY'RE 99.5% sure.\n\n\
                    def f(x):\r\n    return x ** 2  # done   \n\t\tend  ";
        assert_eq!(fast(text, 2), slow(text, &compile(DEFAULT_PATTERN)));
        assert_eq!(fast(text, 3), slow(text, &compile(GPT4_PATTERN)));
    }
}
