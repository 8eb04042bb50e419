"""
Conversion from this project's checkpoints and tokenizer to the Hugging Face formats: a folder
that transformers (>= 5.0, which ships NanoChatForCausalLM, model_type "nanochat", for exactly
this architecture) loads with AutoModelForCausalLM / AutoTokenizer and no custom code.

    config.json             NanoChatConfig: sizes, RoPE base, RMSNorm eps, softcap, special ids
    model.safetensors       the weights under transformers' names, vocabulary padding removed
    tokenizer.json          byte-level BPE with our merges, split pattern and special tokens
    tokenizer_config.json   the chat template: renders exactly what render_for_completion does
    generation_config.json  stop tokens and the sampling defaults of chat_web

The architectures line up one to one (checked against transformers' modeling_nanochat.py):
RMSNorm without weights after the embedding, around attention and the MLP and before lm_head;
RoPE on half-split pairs, then QK-norm; ReLU² MLP; untied lm_head; logits 15·tanh(x/15). The one
constant to carry over is the RMSNorm epsilon: ours is torch's default for fp32 (finfo.eps).

Not for: training or inference (gpt.py, engine.py), or downloading and uploading (scripts).
"""

import json
import os

import torch

from nanochat.common import atomic_write

# nanochat parameter name (per layer: {i}) -> transformers NanoChatForCausalLM name
LAYER_KEYS = {
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}
# F.rms_norm's default eps for the fp32 residual stream (autocast keeps norms in fp32)
RMS_NORM_EPS = torch.finfo(torch.float32).eps
# what the chat_web and chat_cli sample with by default
GENERATION_DEFAULTS = dict(temperature=0.6, top_k=50)

# Renders a conversation as tokenizer.render_for_completion does (with add_generation_prompt) or
# as render_conversation does (without): <|bos|>, a first system message folded into the first
# user message with a blank line, then user and assistant turns, assistant parts of type python
# and python_output wrapped in their tool tokens. Content is a str or a list of {"type", "text"}.
# Two differences no string template can avoid: ours encodes each assistant part on its own, the
# template one string (two adjacent text parts may tokenize differently), and a special token's
# string typed inside content ("<|bos|>") is text to us but the special token to transformers.
CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- set ns = namespace(system=none) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = text_of(message['content']) -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user_start|>' -}}"
    "{%- if ns.system is not none -%}{{- ns.system + '\\n\\n' -}}{%- set ns.system = none -%}{%- endif -%}"
    "{{- text_of(message['content']) -}}{{- '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


class ExportError(ValueError):
    """A checkpoint transformers' NanoChat cannot represent; the message names what."""


def hf_config(model_config, tokenizer, dtype):
    """config.json for NanoChatForCausalLM from a GPTConfig (dict). dtype: "bfloat16" or "float32"."""
    c = model_config
    bos, assistant_end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat",
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": 4 * c.n_embd,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "max_position_embeddings": c.sequence_len, "hidden_act": "relu2", "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "final_logit_softcapping": 15.0,
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "bos_token_id": bos, "eos_token_id": assistant_end, "pad_token_id": bos, "dtype": dtype,
    }


def hf_state_dict(state_dict, model_config, dtype=torch.bfloat16):
    """Our state dict -> {transformers name: tensor in `dtype`}, the vocabulary padding rows
    (wte, lm_head) removed. Shapes: embed_tokens and lm_head (vocab_size, n_embd); q_proj
    (n_head * head_dim, n_embd); k/v_proj (n_kv_head * head_dim, n_embd); o_proj (n_embd, n_embd);
    fc1 (4 n_embd, n_embd); fc2 (n_embd, 4 n_embd).

    Raises:
        ExportError: a key that transformers' NanoChat has no place for (a newer upstream
            architecture: value embeddings, per-layer lambdas, ...), named in the message.
    """
    if model_config.arch != "classic":
        raise ExportError(f"transformers' NanoChat implements the classic architecture; this model is --arch "
                          f"{model_config.arch} (per-layer resid/x0 scalars and gated value embeddings), which it "
                          "cannot represent. Chat with it here (chat_web, chat_cli), or train with --arch classic "
                          "to export")
    V = model_config.vocab_size
    out, unknown = {}, []
    for key, tensor in state_dict.items():
        key = key.removeprefix("_orig_mod.")
        if key == "transformer.wte.weight":
            out["model.embed_tokens.weight"] = tensor[:V]
        elif key == "lm_head.weight":
            out["lm_head.weight"] = tensor[:V]
        elif key.startswith("transformer.h.") and key.split(".", 3)[3] in LAYER_KEYS:
            layer, rest = key.split(".", 3)[2], key.split(".", 3)[3]
            out[f"model.layers.{layer}.{LAYER_KEYS[rest]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ExportError(f"transformers' NanoChat has no place for {', '.join(sorted(unknown)[:5])}"
                          f"{' ...' if len(unknown) > 5 else ''}: this checkpoint's architecture is newer than "
                          "the one it implements, and dropping those weights would export a different model")
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters, which byte-level
    BPE vocabularies (tokenizers' ByteLevel) are written in (openai/gpt-2, encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def recover_merges(mergeable_ranks):
    """The BPE merges [(left bytes, right bytes)] in rank order from tiktoken-style ranks: the
    merge that made a token is found by running BPE on its bytes with only the lower ranks, which
    leaves exactly two parts (the algorithm tiktoken's educational module describes)."""
    merges = []
    for token, rank in sorted(mergeable_ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = mergeable_ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            assert best is not None, f"token {token!r} cannot be built from lower ranks"
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def build_hf_tokenizer(tokenizer):
    """A tokenizers.Tokenizer equal to ours on ordinary text: byte-level BPE with our merges in
    rank order, our split regex (isolated pieces, then the byte-to-character map), the special
    tokens at their ids. Raises ImportError without the `tokenizers` package."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    to_char = bytes_to_unicode()

    def text(b):
        return "".join(to_char[x] for x in b)

    ranks = tokenizer.mergeable_ranks
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in recover_merges(ranks)]
    # ignore_merges: a split piece that is itself in the vocabulary is one token, as in tiktoken
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, token_id in specials:
        assert hf.token_to_id(name) == token_id, f"{name} got id {hf.token_to_id(name)}, expected {token_id}"
    return hf


def export_model(model_config, state_dict, tokenizer, out_dir, dtype="bfloat16"):
    """Write the transformers folder for a model (GPTConfig, its state dict) and our tokenizer to
    out_dir (created; files written atomically). dtype: "bfloat16" (default) or "float32".
    Returns the list of files written.

    Raises:
        ExportError: the architecture cannot be represented (see hf_state_dict).
        ImportError: safetensors or tokenizers is missing.
    """
    from safetensors.torch import save
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    tensors = hf_state_dict(state_dict, model_config, getattr(torch, dtype))
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def write(name, text):
        atomic_write(os.path.join(out_dir, name), text)
        written.append(name)

    write("model.safetensors", save(tensors, metadata={"format": "pt"}))
    write("config.json", json.dumps(hf_config(model_config, tokenizer, dtype), indent=2) + "\n")
    write("tokenizer.json", build_hf_tokenizer(tokenizer).to_str(pretty=False))
    bos, assistant_end = "<|bos|>", "<|assistant_end|>"
    write("tokenizer_config.json", json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": assistant_end,
        "pad_token": bos, "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_config.sequence_len, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    write("generation_config.json", json.dumps({
        "bos_token_id": tokenizer.get_bos_token_id(), "pad_token_id": tokenizer.get_bos_token_id(),
        "eos_token_id": [tokenizer.encode_special(assistant_end), tokenizer.get_bos_token_id()],
        "do_sample": True, **GENERATION_DEFAULTS,
    }, indent=2) + "\n")
    return written


# -----------------------------------------------------------------------------
# Import: a published checkpoint in any of its three layouts -> this project's format

class ImportError_(ValueError):
    """A folder that cannot be imported; the message says what is wrong, in one line."""


def detect_layout(files):
    """The layout of a checkpoint folder from its file list (paths relative to it, "/"-separated):
    "root" (model_<step>.pt, meta_<step>.json and tokenizer.pkl side by side, e.g.
    karpathy/nanochat-d32), "base_dir" (tokenizer/ and <stage>_checkpoints/<tag>/ as this project
    writes them), or "transformers" (config.json, model.safetensors, tokenizer.json).

    Raises:
        ImportError_: none of them.
    """
    names = set(files)
    # native files first: an uploaded repo (scripts/hf_upload.py) holds both, and they are exact
    if "tokenizer/tokenizer.pkl" in names and any("_checkpoints/" in f and f.endswith(".pt") for f in names):
        return "base_dir"
    if {"config.json", "model.safetensors", "tokenizer.json"} <= names:
        return "transformers"
    if "tokenizer.pkl" in names and any(f.startswith("model_") and f.endswith(".pt") and "/" not in f for f in names):
        return "root"
    raise ImportError_("not a nanochat checkpoint: expected model_<step>.pt + meta_<step>.json + tokenizer.pkl, a "
                       "base dir (tokenizer/, base_checkpoints/<tag>/...), or a transformers export (config.json, "
                       f"model.safetensors, tokenizer.json); found {', '.join(sorted(names)[:8]) or 'no files'}")


def check_state_dict(state_dict, model_config):
    """Every tensor's name and shape against the GPT that model_config builds (on the meta device).

    Raises:
        ImportError_: a key of a newer upstream architecture, a missing key or a shape mismatch, named.
    """
    from nanochat.gpt import GPT, GPTConfig
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(GPTConfig(**model_config)).state_dict().items()}
    got = {k.removeprefix("_orig_mod."): tuple(v.shape) for k, v in state_dict.items()}
    unknown = sorted(set(got) - set(expected))
    if unknown:
        raise ImportError_(f"the checkpoint holds {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}, which "
                           "this project's GPT does not have: it comes from a newer upstream nanochat architecture "
                           "(value embeddings, per-layer scalars: upstream from January 2026 on); use upstream's "
                           "code for it, or a checkpoint of the late-2025 architecture")
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ImportError_(f"the checkpoint lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for key, shape in expected.items():
        if got[key] != shape:
            raise ImportError_(f"{key} has shape {list(got[key])} but the meta's model_config {model_config} needs "
                               f"{list(shape)}")


def native_from_transformers(folder):
    """(model_config dict, our state dict, RustBPETokenizer) from a transformers export of a
    NanoChat model (what export_model writes, or transformers' own converter).

    Raises:
        ImportError_: not a NanoChat model, or a tokenizer that is not byte-level BPE with our special tokens.
    """
    from safetensors.torch import load_file
    from nanochat.gpt import padded_vocab_size
    from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") != "nanochat":
        raise ImportError_(f"config.json is a {config.get('model_type')!r} model, not 'nanochat'")
    model_config = dict(sequence_len=config["max_position_embeddings"], vocab_size=config["vocab_size"],
                        n_layer=config["num_hidden_layers"], n_head=config["num_attention_heads"],
                        n_kv_head=config.get("num_key_value_heads") or config["num_attention_heads"],
                        n_embd=config["hidden_size"])
    try:
        tensors = load_file(os.path.join(folder, "model.safetensors"))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ImportError_(f"model.safetensors cannot be read ({str(e).splitlines()[0]})") from None
    inverse = {v: k for k, v in LAYER_KEYS.items()}
    V, padded = config["vocab_size"], padded_vocab_size(config["vocab_size"])
    state = {}
    for key, tensor in tensors.items():
        tensor = tensor.float()
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = torch.zeros(padded - V, tensor.size(1))
            state["transformer.wte.weight" if key.startswith("model.") else "lm_head.weight"] = torch.cat([tensor, rows])
        elif key.startswith("model.layers.") and key.split(".", 3)[3] in inverse:
            state[f"transformer.h.{key.split('.')[2]}.{inverse[key.split('.', 3)[3]]}"] = tensor
        else:
            state[key] = tensor  # check_state_dict names it
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    try:
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        ranks = {bytes(to_byte[c] for c in token): rank for token, rank in spec["model"]["vocab"].items()}
        pattern = next(p["pattern"]["Regex"] for p in spec["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split")
        specials = [t["content"] for t in sorted(spec["added_tokens"], key=lambda t: t["id"])]
        tokenizer = RustBPETokenizer(ranks, pattern, specials)
    except (KeyError, TypeError, StopIteration, ValueError) as e:
        raise ImportError_(f"tokenizer.json is not a byte-level BPE tokenizer with nanochat's special tokens "
                           f"{SPECIAL_TOKENS} ({type(e).__name__}: {e})") from None
    return model_config, state, tokenizer
