//! Pre-tokenization: split text into chunks with a regex pattern and count unique chunks.
//!
//! BPE never merges across chunk boundaries, so training only needs each unique chunk and how
//! often it occurs. Not for: merging (`train`) or encoding (`encode`).

use crate::gpt4;
use fancy_regex::Regex;
use rayon::prelude::*;
use rustc_hash::FxHashMap;

/// The GPT-4 split pattern with numbers in groups of 1-2 digits (GPT-4 uses 1-3), as in
/// nanochat: a smaller vocabulary spends fewer tokens on multi-digit numbers.
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// GPT-4's own split pattern (numbers in groups of 1-3 digits), the PyPI `rustbpe` default.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// Counts of unique chunks accumulated over all texts seen so far.
pub type ChunkCounts = FxHashMap<Box<str>, i64>;

/// Splits text into chunks with a pattern: the two GPT-4 patterns above go to a hand-written
/// matcher that is many times faster, any other pattern to fancy-regex (which supports the
/// look-ahead and possessive quantifiers these patterns use).
pub enum Splitter {
    Gpt4 { max_digits: usize },
    Regex(Regex),
}

impl Splitter {
    /// Errors: a message naming the pattern when it does not compile.
    pub fn new(pattern: &str) -> Result<Self, String> {
        Ok(match pattern {
            DEFAULT_PATTERN => Splitter::Gpt4 { max_digits: 2 },
            GPT4_PATTERN => Splitter::Gpt4 { max_digits: 3 },
            _ => Splitter::Regex(Regex::new(pattern).map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))?),
        })
    }

    /// Call `f` on each non-empty chunk of `text`, in order.
    ///
    /// Errors: the regex engine gave up on the text (e.g. its backtracking limit was hit).
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { max_digits } => gpt4::for_each_chunk(text, *max_digits, f),
            Splitter::Regex(regex) => {
                for m in regex.find_iter(text) {
                    let m = m.map_err(|e| format!("splitting text with the pattern failed: {e}"))?;
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Split every text (in parallel over the texts) and add each chunk to `counts`.
///
/// Errors: the regex engine gave up on some text.
pub fn count_chunks(splitter: &Splitter, texts: &[String], counts: &mut ChunkCounts) -> Result<(), String> {
    // Each rayon job counts into its own map of borrowed slices; only chunks that are new to
    // the global map get copied, so the common case is one hash lookup per chunk.
    let local = texts
        .par_iter()
        .try_fold(FxHashMap::<&str, i64>::default, |mut local, text| {
            splitter.for_each_chunk(text, |chunk| *local.entry(chunk).or_default() += 1)?;
            Ok(local)
        })
        .try_reduce(FxHashMap::default, |a, b| -> Result<_, String> {
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
            for (chunk, n) in small {
                *big.entry(chunk).or_default() += n;
            }
            Ok(big)
        })?;
    for (chunk, n) in local {
        match counts.get_mut(chunk) {
            Some(total) => *total += n,
            None => {
                counts.insert(chunk.into(), n);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split<'t>(pattern: &str, text: &'t str) -> Vec<&'t str> {
        let mut chunks = Vec::new();
        Splitter::new(pattern).unwrap().for_each_chunk(text, |c| chunks.push(c)).unwrap();
        chunks
    }

    #[test]
    fn default_pattern_splits_like_gpt4_with_two_digit_numbers() {
        assert_eq!(
            split(DEFAULT_PATTERN, "Hello world's 12345 apples!!\n\n  ok"),
            ["Hello", " world", "'s", " ", "12", "34", "5", " apples", "!!\n\n", " ", " ok"]
        );
        assert_eq!(split(GPT4_PATTERN, "12345"), ["123", "45"]);
    }

    #[test]
    fn other_patterns_go_to_fancy_regex() {
        assert_eq!(split(r"\d+|\D", "ab12"), ["a", "b", "12"]);
        assert_eq!(split(r"a*", "baa"), ["aa"]);
    }

    #[test]
    fn counts_accumulate_across_calls() {
        let splitter = Splitter::new(DEFAULT_PATTERN).unwrap();
        let mut counts = ChunkCounts::default();
        count_chunks(&splitter, &["a b a".to_string(), "b".to_string()], &mut counts).unwrap();
        count_chunks(&splitter, &["a".to_string()], &mut counts).unwrap();
        assert_eq!(counts.get("a"), Some(&2));
        assert_eq!(counts.get(" a"), Some(&1));
        assert_eq!(counts.get(" b"), Some(&1));
        assert_eq!(counts.get("b"), Some(&1));
        assert_eq!(counts.len(), 4);
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        let Err(err) = Splitter::new("(") else { panic!("\"(\" compiled") };
        assert!(err.contains("invalid split pattern"), "{err}");
    }
}
