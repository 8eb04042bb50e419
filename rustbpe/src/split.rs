//! Pre-tokenization: split text into chunks with a regex pattern and count unique chunks.
//!
//! BPE never merges across chunk boundaries, so training only needs each unique chunk and how
//! often it occurs. Not for: merging (`train`) or encoding (`encode`).

use fancy_regex::Regex;
use rayon::prelude::*;
use rustc_hash::FxHashMap;

/// The GPT-4 split pattern with numbers in groups of 1-2 digits (GPT-4 uses 1-3), as in
/// nanochat: a smaller vocabulary spends fewer tokens on multi-digit numbers.
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// Counts of unique chunks accumulated over all texts seen so far.
pub type ChunkCounts = FxHashMap<Box<str>, i64>;

/// Compile a split pattern; fancy-regex is needed for look-ahead and possessive quantifiers.
///
/// Errors: a message naming the pattern when it does not compile.
pub fn compile_pattern(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
}

/// Split every text with `regex` (in parallel over the texts) and add each chunk to `counts`.
///
/// Empty matches are skipped: they carry no bytes to merge.
/// Errors: the regex engine gave up on some text (e.g. its backtracking limit was hit).
pub fn count_chunks(regex: &Regex, texts: &[String], counts: &mut ChunkCounts) -> Result<(), String> {
    // Each rayon job counts into its own map of borrowed slices; only chunks that are new to
    // the global map get copied, so the common case is one hash lookup per chunk.
    let local = texts
        .par_iter()
        .try_fold(FxHashMap::<&str, i64>::default, |mut local, text| {
            for m in regex.find_iter(text) {
                let m = m.map_err(|e| format!("splitting text with the pattern failed: {e}"))?;
                if !m.as_str().is_empty() {
                    *local.entry(m.as_str()).or_default() += 1;
                }
            }
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

    fn split(text: &str) -> Vec<String> {
        let re = compile_pattern(DEFAULT_PATTERN).unwrap();
        re.find_iter(text).map(|m| m.unwrap().as_str().to_string()).collect()
    }

    #[test]
    fn default_pattern_splits_like_gpt4_with_two_digit_numbers() {
        assert_eq!(
            split("Hello world's 12345 apples!!\n\n  ok"),
            ["Hello", " world", "'s", " ", "12", "34", "5", " apples", "!!\n\n", " ", " ok"]
        );
    }

    #[test]
    fn counts_accumulate_across_calls() {
        let re = compile_pattern(DEFAULT_PATTERN).unwrap();
        let mut counts = ChunkCounts::default();
        count_chunks(&re, &["a b a".to_string(), "b".to_string()], &mut counts).unwrap();
        count_chunks(&re, &["a".to_string()], &mut counts).unwrap();
        assert_eq!(counts.get("a"), Some(&2));
        assert_eq!(counts.get(" a"), Some(&1));
        assert_eq!(counts.get(" b"), Some(&1));
        assert_eq!(counts.get("b"), Some(&1));
        assert_eq!(counts.len(), 4);
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        let err = compile_pattern("(").unwrap_err();
        assert!(err.contains("invalid split pattern"), "{err}");
    }
}
