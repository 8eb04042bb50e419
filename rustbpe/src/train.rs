//! The BPE merge loop: from counted unique chunks to an ordered list of merges.
//!
//! Each merge touches only the chunks that contain the merged pair: a pair -> chunks index says
//! which, and pair counts are updated by the difference a merge makes to each touched chunk
//! instead of recounting. The most frequent pair comes from a max-heap with lazy refresh: an
//! entry may hold a stale (too high) count, so a popped entry whose count no longer matches is
//! pushed back with its current count. Counts of existing pairs only ever go down (a merge
//! creates pairs only with the new token), so a popped entry that matches is the true maximum.
//!
//! Ties are broken deterministically: the highest count wins, then the smallest pair (a, b)
//! comparing token ids a first, then b. The PyPI `rustbpe` package breaks ties the same way.

use rustc_hash::FxHashMap;
use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::BinaryHeap;

/// A pair of adjacent token ids; merge number i creates token id 256 + i.
pub type Pair = (u32, u32);

/// Pairs are packed as `a << 32 | b`, so integer order is the (a, b) tie-breaking order.
fn pack(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

fn unpack(key: u64) -> Pair {
    ((key >> 32) as u32, key as u32)
}

/// How often a pair occurs (weighted by chunk counts) and which chunks may contain it.
///
/// `chunks` can hold chunks that no longer contain the pair (a merge there took it away);
/// merging such a chunk changes nothing, which is cheaper than keeping the list exact.
#[derive(Default)]
struct PairStats {
    count: i64,
    chunks: Vec<u32>,
}

/// Unique chunks stored back to back in one array, each as a header (its current length and
/// its count as two u32 halves) followed by its token ids; merges shrink a chunk in place.
///
/// A chunk is named by the offset of its header, so visiting one costs a single cache miss
/// rather than one per parallel array: profiling showed the merge loop bound by those misses.
struct Chunks {
    data: Vec<u32>,
}

const HEADER: usize = 3;

/// Pair statistics, plus the pairs created by the merge in progress (they enter the heap once
/// it is done, with their counts summed over all chunks).
#[derive(Default)]
struct PairIndex {
    stats: FxHashMap<u64, PairStats>,
    created: Vec<u64>,
}

/// Learn up to `num_merges` merges from unique chunks (as bytes) and their counts.
///
/// Returns fewer merges when the chunks run out of pairs. The result does not depend on the
/// order of `chunks`. Chunk counts must be positive.
pub fn train_merges<B: AsRef<[u8]>>(
    chunks: impl IntoIterator<Item = (B, i64)>,
    num_merges: usize,
) -> Vec<Pair> {
    let (mut chunks, mut index) = index_chunks(chunks);
    let mut heap: BinaryHeap<(i64, Reverse<u64>)> = index
        .stats
        .iter()
        .map(|(&key, stats)| (stats.count, Reverse(key)))
        .collect();
    let mut merges = Vec::new();
    while merges.len() < num_merges {
        let Some((count, Reverse(key))) = heap.pop() else {
            break;
        };
        let current = index.stats.get(&key).map_or(0, |stats| stats.count);
        if current != count {
            if current > 0 {
                heap.push((current, Reverse(key)));
            }
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        let stats = index.stats.remove(&key).expect("merged pair has statistics");
        for &chunk in &stats.chunks {
            chunks.merge(chunk, key, new_id, &mut index);
        }
        index.created.sort_unstable();
        index.created.dedup();
        for &created in &index.created {
            if let Some(stats) = index.stats.get(&created) {
                heap.push((stats.count, Reverse(created)));
            }
        }
        index.created.clear();
        merges.push(unpack(key));
    }
    merges
}

/// Store the chunks as token ids and count their (byte) pairs.
fn index_chunks<B: AsRef<[u8]>>(input: impl IntoIterator<Item = (B, i64)>) -> (Chunks, PairIndex) {
    let mut chunks = Chunks { data: Vec::new() };
    // Initial pairs are byte pairs, so a dense table of 65536 slots counts them without hashing.
    let mut byte_pairs: Vec<PairStats> = (0..1 << 16).map(|_| PairStats::default()).collect();
    for (bytes, count) in input {
        let bytes = bytes.as_ref();
        assert!(count > 0, "chunk counts must be positive");
        // A single byte has no pair to merge and never will.
        if bytes.len() < 2 {
            continue;
        }
        let chunk = u32::try_from(chunks.data.len()).expect("unique chunks fit in 2^32 token ids");
        for pair in bytes.windows(2) {
            let stats = &mut byte_pairs[(usize::from(pair[0]) << 8) | usize::from(pair[1])];
            stats.count += count;
            if stats.chunks.last() != Some(&chunk) {
                stats.chunks.push(chunk);
            }
        }
        let count = count as u64;
        chunks
            .data
            .extend([bytes.len() as u32, count as u32, (count >> 32) as u32]);
        chunks.data.extend(bytes.iter().map(|&b| u32::from(b)));
    }
    let mut index = PairIndex::default();
    for (slot, stats) in byte_pairs.into_iter().enumerate() {
        if stats.count > 0 {
            index
                .stats
                .insert(pack((slot >> 8) as u32, (slot & 0xff) as u32), stats);
        }
    }
    (chunks, index)
}

impl Chunks {
    /// Merge the pair `key` into `new_id` in one chunk, left to right, in place.
    ///
    /// Every old pair touching a merged occurrence is subtracted and every new pair touching
    /// `new_id` is added, each once: the pair between two back-to-back occurrences is handled by
    /// the second one.
    fn merge(&mut self, chunk: u32, key: u64, new_id: u32, index: &mut PairIndex) {
        let (a, b) = unpack(key);
        let header = chunk as usize;
        let len = self.data[header] as usize;
        let count = (u64::from(self.data[header + 1]) | (u64::from(self.data[header + 2]) << 32)) as i64;
        let ids = &mut self.data[header + HEADER..header + HEADER + len];
        let is_occurrence = |ids: &[u32], j: usize| j + 1 < len && ids[j] == a && ids[j + 1] == b;
        let mut out = 0;
        let mut i = 0;
        while i < len {
            if !is_occurrence(ids, i) {
                ids[out] = ids[i];
                out += 1;
                i += 1;
                continue;
            }
            if out > 0 {
                // ids[..out] already holds the merged prefix, so this is the new left neighbour.
                let left = ids[out - 1];
                if left == new_id {
                    index.subtract(pack(b, a), key, count);
                } else {
                    index.subtract(pack(left, a), key, count);
                }
                index.add(pack(left, new_id), chunk, count);
            }
            if i + 2 < len && !is_occurrence(ids, i + 2) {
                let right = ids[i + 2];
                index.subtract(pack(b, right), key, count);
                index.add(pack(new_id, right), chunk, count);
            }
            ids[out] = new_id;
            out += 1;
            i += 2;
        }
        self.data[header] = out as u32;
    }
}

impl PairIndex {
    /// Take `count` occurrences away from a pair; the pair being merged was already dropped.
    fn subtract(&mut self, key: u64, merging: u64, count: i64) {
        if key == merging {
            return;
        }
        let Entry::Occupied(mut entry) = self.stats.entry(key) else {
            unreachable!("a pair present in a chunk has statistics")
        };
        entry.get_mut().count -= count;
        if entry.get().count == 0 {
            entry.remove();
        }
    }

    fn add(&mut self, key: u64, chunk: u32, count: i64) {
        let stats = self.stats.entry(key).or_default();
        stats.count += count;
        if stats.chunks.last() != Some(&chunk) {
            stats.chunks.push(chunk);
        }
        self.created.push(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward BPE: recount every pair before every merge.
    fn reference(chunks: &[(&[u8], i64)], num_merges: usize) -> Vec<Pair> {
        let mut words: Vec<(Vec<u32>, i64)> = chunks
            .iter()
            .map(|(b, c)| (b.iter().map(|&x| u32::from(x)).collect(), *c))
            .collect();
        let mut merges = Vec::new();
        while merges.len() < num_merges {
            let mut counts: FxHashMap<Pair, i64> = FxHashMap::default();
            for (w, c) in &words {
                for p in w.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += c;
                }
            }
            let Some((&best, _)) = counts.iter().max_by_key(|(p, c)| (**c, Reverse(**p))) else {
                break;
            };
            let new_id = 256 + merges.len() as u32;
            for (w, _) in &mut words {
                let mut merged = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                        merged.push(new_id);
                        i += 2;
                    } else {
                        merged.push(w[i]);
                        i += 1;
                    }
                }
                *w = merged;
            }
            merges.push(best);
        }
        merges
    }

    #[test]
    fn repeated_runs_merge_like_the_reference() {
        let chunks: Vec<(&[u8], i64)> = vec![
            (b"aaaa", 3),
            (b"aaa", 2),
            (b"abab", 5),
            (b"ababab", 1),
            (b"ba", 4),
            (b" aaab", 2),
        ];
        for n in 0..12 {
            assert_eq!(
                train_merges(chunks.iter().copied(), n),
                reference(&chunks, n),
                "{n} merges"
            );
        }
    }

    #[test]
    fn text_merges_like_the_reference() {
        let text = "the quick brown fox jumps over the lazy dog; the dog sleeps, the fox thinks";
        let mut counts: FxHashMap<&[u8], i64> = FxHashMap::default();
        for w in text.split_inclusive(' ') {
            *counts.entry(w.as_bytes()).or_default() += 1;
        }
        let chunks: Vec<(&[u8], i64)> = counts.into_iter().collect();
        assert_eq!(train_merges(chunks.iter().copied(), 40), reference(&chunks, 40));
    }

    #[test]
    fn ties_go_to_the_smallest_pair() {
        // "ab", "cd" and "ba" all occur twice; (a, b) = (97, 98) is the smallest.
        let merges = train_merges([(&b"ab"[..], 2), (&b"cd"[..], 2), (&b"ba"[..], 2)], 1);
        assert_eq!(merges, [(97, 98)]);
    }

    #[test]
    fn stops_when_no_pairs_are_left() {
        let merges = train_merges([(&b"abc"[..], 1), (&b"x"[..], 9)], 10);
        assert_eq!(merges, [(97, 98), (256, 99)]);
    }
}
