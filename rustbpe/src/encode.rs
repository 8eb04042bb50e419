//! Encoding and decoding with learned merges, for tests and small jobs.
//!
//! Chunks are encoded by repeatedly merging the pair that was learned first, which reproduces
//! the tokens training produced. Bulk encoding in the pipeline goes through tiktoken instead.

use crate::split::Splitter;
use crate::train::Pair;
use rustc_hash::FxHashMap;

/// The learned merges, looked up by pair.
pub struct Encoder {
    /// pair -> the token id its merge created (a smaller id was learned earlier)
    merged: FxHashMap<Pair, u32>,
}

impl Encoder {
    /// Build an encoder from merges in training order (merge i creates token 256 + i).
    pub fn new(merges: &[Pair]) -> Self {
        let merged = merges
            .iter()
            .enumerate()
            .map(|(i, &pair)| (pair, 256 + i as u32))
            .collect();
        Encoder { merged }
    }

    /// Encode one chunk of bytes, appending its token ids to `out`.
    pub fn encode_chunk(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        while ids.len() >= 2 {
            let best = ids
                .windows(2)
                .filter_map(|w| self.merged.get(&(w[0], w[1])).map(|&id| (id, (w[0], w[1]))))
                .min();
            let Some((new_id, pair)) = best else { break };
            let mut merged = Vec::with_capacity(ids.len());
            let mut i = 0;
            while i < ids.len() {
                if i + 1 < ids.len() && (ids[i], ids[i + 1]) == pair {
                    merged.push(new_id);
                    i += 2;
                } else {
                    merged.push(ids[i]);
                    i += 1;
                }
            }
            ids = merged;
        }
        out.extend(ids);
    }

    /// Split `text` into chunks and encode each one.
    ///
    /// Errors: the regex engine gave up on the text.
    pub fn encode(&self, splitter: &Splitter, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        splitter.for_each_chunk(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out))?;
        Ok(out)
    }
}

/// The bytes of every token: the 256 single bytes, then one entry per merge.
pub fn token_bytes(merges: &[Pair]) -> Vec<Vec<u8>> {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut bytes = tokens[a as usize].clone();
        bytes.extend_from_slice(&tokens[b as usize]);
        tokens.push(bytes);
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::DEFAULT_PATTERN;

    #[test]
    fn encodes_with_earliest_merge_first() {
        // Merges: "ab" -> 256, "bc" -> 257, then "a" + "bc" -> 258.
        let encoder = Encoder::new(&[(97, 98), (98, 99), (97, 257)]);
        let mut out = Vec::new();
        encoder.encode_chunk(b"abc", &mut out);
        assert_eq!(out, [256, 99]);
        out.clear();
        encoder.encode_chunk(b"xbc", &mut out);
        assert_eq!(out, [120, 257]);
    }

    #[test]
    fn decoding_token_bytes_round_trips() {
        let merges = [(104, 105), (256, 32)];
        let encoder = Encoder::new(&merges);
        let splitter = Splitter::new(DEFAULT_PATTERN).unwrap();
        let ids = encoder.encode(&splitter, "hi hi, ok").unwrap();
        let tokens = token_bytes(&merges);
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| tokens[id as usize].clone()).collect();
        assert_eq!(bytes, b"hi hi, ok");
        assert_eq!(tokens[257], b"hi ");
    }
}
