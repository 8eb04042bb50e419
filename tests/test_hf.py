"""
nanochat/hf.py and scripts/hf_export.py: an exported checkpoint loads in transformers with no
custom code and is the same model (same fp32 logits, same greedy tokens), its tokenizer encodes
like ours, its chat template renders our prompt ids, and what transformers' NanoChat cannot
represent is refused by name.
"""

import os
import subprocess
import sys

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.hf import ExportError, export_model, hf_state_dict, recover_merges
from nanochat.tokenizer import RustBPETokenizer

transformers = pytest.importorskip("transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["The cat sat on the mat. Hello, how are you today? I am fine, thank you. It's 12:30 now.",
         "Numbers like 12 and 345 add up: 12 + 345 = 357. Python prints results.\n\n  Indented\ttabs"] * 30
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12 + 345?"}],
    [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "kind."}]},
     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How are you?"},
     {"role": "user", "content": [{"type": "text", "text": "Fine. "}, {"type": "text", "text": "Add 2 and 3."}]},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me: "}, {"type": "python", "text": "2+3"},
                                       {"type": "python_output", "text": "5"}, {"type": "text", "text": " so 5."}]},
     {"role": "user", "content": "Thanks!\n\nBye"}],
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A d2 model with non-trivial weights and a small trained tokenizer, exported in fp32."""
    tokenizer = RustBPETokenizer.train_from_iterator(iter(TEXTS), 420)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=tokenizer.get_vocab_size(), sequence_len=128))
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections would hide a wrong mapping of them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    out = tmp_path_factory.mktemp("hf")
    export_model(model.config, model.state_dict(), tokenizer, str(out), "float32")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    return model, tokenizer, hf_model, hf_tokenizer, out


def test_same_logits_in_fp32(exported):
    """fp32 on CPU: the two implementations do the same operations, so the logits agree to float
    rounding; 1e-4 bounds it (measured 0.0 at d2)."""
    model, tokenizer, hf_model, _, _ = exported
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    ids = torch.tensor([tokenizer.encode("The cat sat on 12 mats, then 345 more.", prepend="<|bos|>")])
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert theirs.shape == ours.shape  # (1, T, vocab_size): the padding rows are gone
    assert (ours - theirs).abs().max().item() < 1e-4


def test_same_greedy_tokens(exported):
    from nanochat.engine import Engine
    model, tokenizer, hf_model, _, _ = exported
    prompt = tokenizer.encode("Hello, how", prepend="<|bos|>")
    ours = Engine(model, tokenizer).generate_batch(prompt, max_tokens=20, temperature=0.0)[0][0]
    ids = torch.tensor([prompt])
    # no stop tokens here (the Engine ran to max_tokens), so the attention mask must be given: with
    # eos unset, generate() would infer one from the pad id, which is <|bos|>, and mask the prompt's first token
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(ours) - len(prompt),
                            do_sample=False, eos_token_id=None)
    assert out[0].tolist() == ours
    # as a user calls it: the exported generation config (its stop tokens include the pad id, so
    # generate() does not infer a mask that hides <|bos|>)
    out = hf_model.generate(ids, max_new_tokens=len(ours) - len(prompt), do_sample=False)
    assert out[0].tolist() == ours


def test_tokenizer_and_chat_template_give_our_ids(exported):
    _, tokenizer, _, hf_tokenizer, _ = exported
    for text in TEXTS[:2] + ["unseen wörds, émojis 🙂 and   spaces\r\n", "1234567 x 89"]:
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
        assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    for messages in CONVERSATIONS:
        rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
        assert rendered == tokenizer.render_for_completion({"messages": messages})
    full = CONVERSATIONS[2][:-1]  # ending with the assistant: the training render
    rendered = hf_tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    assert rendered == tokenizer.render_conversation({"messages": full})[0]


def test_generation_config_stops_where_our_engine_stops(exported):
    _, tokenizer, hf_model, _, out = exported
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    assert set(hf_model.generation_config.eos_token_id) == stops
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json"}


def test_merges_are_recovered_from_ranks():
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"cab": 258})
    assert recover_merges(ranks)[:3] == [(b"a", b"b"), (b"ab", b"c"), (b"c", b"ab")]


def test_an_architecture_transformers_cannot_hold_is_refused_by_name():
    model = GPT(GPTConfig.from_depth(1, vocab_size=300, sequence_len=32))
    model.init_weights()
    state = dict(model.state_dict(), **{"value_embeds.0.weight": torch.zeros(300, 64)})
    with pytest.raises(ExportError, match="no place for value_embeds.0.weight"):
        hf_state_dict(state, model.config)


def test_hf_export_script_writes_bf16_by_default(chat_base_dir, tmp_path):
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "scripts.hf_export", "--source", "sft", "--model-tag", "d1",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NANOCHAT_BASE_DIR=str(chat_base_dir)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exported sft d1 step 0 (bfloat16)" in proc.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert next(model.parameters()).dtype == torch.bfloat16
    missing = subprocess.run([sys.executable, "-m", "scripts.hf_export", "--source", "rl"], cwd=REPO,
                             capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, NANOCHAT_BASE_DIR=str(chat_base_dir)))
    assert missing.returncode != 0 and missing.stderr.startswith("hf_export: ") and "Traceback" not in missing.stderr


def test_shell_wrapper_exports_to_a_folder_relative_to_where_it_runs(chat_base_dir, tmp_path):
    proc = subprocess.run(["bash", os.path.join(REPO, "hf_export.sh"), "-s", "sft", "-g", "d1", "-o", "mine",
                           "--dtype", "float32"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NANOCHAT_BASE_DIR=str(chat_base_dir)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "mine" / "model.safetensors").is_file() and "(float32)" in proc.stdout
