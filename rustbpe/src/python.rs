//! The Python module `rustbpe`: the same surface as the PyPI `rustbpe` package, so that either
//! can be used by `nanochat.tokenizer`.

use crate::encode::{token_bytes, Encoder};
use crate::split::{count_chunks, ChunkCounts, Splitter, DEFAULT_PATTERN};
use crate::train::{train_merges, Pair};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rayon::prelude::*;

/// A byte-level BPE tokenizer: train it on text, then hand its ranks to tiktoken.
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    merges: Vec<Pair>,
    /// None until trained: encoding with no merges learned is almost surely a mistake.
    encoder: Option<Encoder>,
}

#[pymethods]
impl Tokenizer {
    /// An untrained tokenizer with the default (GPT-4 style, 1-2 digit numbers) pattern.
    #[new]
    fn new() -> Self {
        let splitter = Splitter::new(DEFAULT_PATTERN).expect("the default pattern compiles");
        Tokenizer {
            pattern: DEFAULT_PATTERN.to_string(),
            splitter,
            merges: Vec::new(),
            encoder: None,
        }
    }

    /// Train on the strings an iterator yields, learning `vocab_size - 256` merges.
    ///
    /// Strings are pulled `buffer_size` at a time with the GIL held, then split and counted
    /// in parallel with the GIL released. `pattern` is the split regex (None: the default).
    /// The vocabulary can come out smaller when the text runs out of pairs to merge.
    /// Raises ValueError for vocab_size outside [256, 2^32), buffer_size < 1 or an invalid pattern, and
    /// TypeError when the iterator yields something other than str.
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            )));
        }
        if vocab_size > i64::from(u32::MAX) {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at most 2^32 - 1 (token ids are u32), got {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!(
                "buffer_size must be at least 1, got {buffer_size}"
            )));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;

        let mut counts = ChunkCounts::default();
        let mut buffer: Vec<String> = Vec::new();
        let mut items = iterator.try_iter()?;
        loop {
            let exhausted = fill_buffer(&mut items, &mut buffer, buffer_size as usize)?;
            py.detach(|| count_chunks(&splitter, &buffer, &mut counts))
                .map_err(PyValueError::new_err)?;
            buffer.clear();
            if exhausted {
                break;
            }
        }

        let num_merges = (vocab_size - 256) as usize;
        let merges = py.detach(|| train_merges(counts.iter(), num_merges));
        self.encoder = Some(Encoder::new(&merges));
        self.merges = merges;
        self.pattern = pattern;
        self.splitter = splitter;
        Ok(())
    }

    /// The split pattern in use (the default until trained with another).
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// Number of tokens: 256 bytes plus the learned merges.
    #[getter]
    fn vocab_size(&self) -> usize {
        256 + self.merges.len()
    }

    /// The vocabulary as (token bytes, rank) pairs, rank = token id: the 256 single bytes
    /// (rank = byte value) then the merges in the order learned. This is what
    /// `tiktoken.Encoding(mergeable_ranks=dict(...))` takes.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        token_bytes(&self.merges)
            .iter()
            .enumerate()
            .map(|(rank, bytes)| (PyBytes::new(py, bytes), rank as u32))
            .collect()
    }

    /// Encode a string into token ids. Raises ValueError if the tokenizer is not trained.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let encoder = self.trained_encoder()?;
        py.detach(|| encoder.encode(&self.splitter, text))
            .map_err(PyValueError::new_err)
    }

    /// Encode many strings in parallel (GIL released); same result as encoding one by one.
    /// Raises ValueError if the tokenizer is not trained.
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        let encoder = self.trained_encoder()?;
        py.detach(|| {
            texts
                .par_iter()
                .map(|text| encoder.encode(&self.splitter, text))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(PyValueError::new_err)
    }

    /// Decode token ids to a string; bytes that are not valid UTF-8 become U+FFFD.
    /// Raises ValueError for an id outside the vocabulary.
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        let tokens = token_bytes(&self.merges);
        let mut bytes = Vec::new();
        for id in ids {
            let token = tokens.get(id as usize).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "token id {id} is outside the vocabulary of {}",
                    tokens.len()
                ))
            })?;
            bytes.extend_from_slice(token);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

impl Tokenizer {
    fn trained_encoder(&self) -> PyResult<&Encoder> {
        self.encoder.as_ref().ok_or_else(|| {
            PyValueError::new_err("the tokenizer is not trained yet: call train_from_iterator first")
        })
    }
}

/// Pull up to `size` strings from `items` into `buffer`; returns whether the iterator is done.
fn fill_buffer(
    items: &mut Bound<'_, pyo3::types::PyIterator>,
    buffer: &mut Vec<String>,
    size: usize,
) -> PyResult<bool> {
    while buffer.len() < size {
        let Some(item) = items.next() else { return Ok(true) };
        let item = item?;
        let text = item.downcast::<PyString>().map_err(|_| {
            let type_name = item
                .get_type()
                .name()
                .map_or_else(|_| "?".to_string(), |n| n.to_string());
            PyTypeError::new_err(format!(
                "train_from_iterator expects an iterator of str, got an item of type {type_name}"
            ))
        })?;
        buffer.push(text.to_str()?.to_owned());
    }
    Ok(false)
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    Ok(())
}
