//! Byte-level BPE tokenizer training for nanochat-spark, exposed to Python as `rustbpe`.
//!
//! The pipeline is: split text into chunks with a regex pattern and count the unique chunks
//! ([`split`]), learn merges over those counts ([`train`]), and encode new text with the learned
//! merges ([`encode`]). The Python bindings live behind the `python` feature so that plain
//! `cargo test` needs no libpython. Fast encoding at training time is tiktoken's job, not ours:
//! `Tokenizer.get_mergeable_ranks()` hands it the vocabulary.

pub mod encode;
mod gpt4;
pub mod split;
pub mod train;

#[cfg(feature = "python")]
mod python;
