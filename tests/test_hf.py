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


def test_a_modern_arch_model_is_refused_by_its_arch(tmp_path):
    model = GPT(GPTConfig.from_depth(2, vocab_size=300, sequence_len=32, arch="modern"))
    model.init_weights()
    with pytest.raises(ExportError, match="this model is --arch modern .* train with --arch classic to export"):
        export_model(model.config, model.state_dict(), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


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


# -----------------------------------------------------------------------------
# Import: three layouts in, every damaged one refused with the base dir unchanged

def run_import(base_dir, *args):
    return subprocess.run([sys.executable, "-m", "scripts.hf_import", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir)))


def write_root_layout(folder, model, tokenizer, step=5, extra_keys=None):
    """Upstream's published layout: model/meta side by side, the tokenizer as a pickled tiktoken.Encoding."""
    import json
    import pickle

    import tiktoken
    folder.mkdir(parents=True)
    torch.save({**model.state_dict(), **(extra_keys or {})}, folder / f"model_{step:06d}.pt")
    (folder / f"meta_{step:06d}.json").write_text(json.dumps({"model_config": model.config.__dict__, "step": step}))
    with open(folder / "tokenizer.pkl", "wb") as f:
        pickle.dump(tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.pattern, mergeable_ranks=tokenizer.mergeable_ranks,
                                      special_tokens=tokenizer.special_tokens), f)
    return folder


def imported_logits(base_dir, stage, ids):
    code = ("import sys, torch; from nanochat.checkpoint_manager import load_model; "
            f"m, t, _ = load_model('{stage}', torch.device('cpu'), 'eval'); "
            f"torch.save(m(torch.tensor([{ids}])), sys.argv[1])")
    out = base_dir / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir)))
    assert proc.returncode == 0, proc.stderr
    return torch.load(out)


def test_import_all_three_layouts(exported, tmp_path):
    from nanochat.checkpoint_manager import save_checkpoint
    model, tokenizer, _, _, hf_folder = exported
    ids = tokenizer.encode("The cat sat on 12 mats.", prepend="<|bos|>")
    with torch.no_grad():
        expected = model(torch.tensor([ids]))
    nested = tmp_path / "nested"
    tokenizer.save(str(nested / "tokenizer"))
    save_checkpoint(str(nested / "mid_checkpoints" / "d2"), 7, model.state_dict(), None,
                    {"model_config": model.config.__dict__})
    layouts = [("root", write_root_layout(tmp_path / "root", model, tokenizer), ["--stage", "base"], "base"),
               ("base_dir", nested, [], "mid"),  # the stage comes from the folder
               ("transformers", hf_folder, ["--stage", "sft"], "sft")]
    for layout, folder, flags, stage in layouts:
        base_dir = tmp_path / f"into_{layout}"
        proc = run_import(base_dir, folder, *flags)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"({layout} layout" in proc.stdout and f"as the {stage} checkpoint" in proc.stdout
        assert (imported_logits(base_dir, stage, ids) - expected).abs().max().item() < 1e-5


def test_damaged_imports_are_refused_and_change_nothing(exported, tmp_path):
    model, tokenizer, _, _, _ = exported
    good = write_root_layout(tmp_path / "good", model, tokenizer)
    truncated = write_root_layout(tmp_path / "truncated", model, tokenizer)
    data = (truncated / "model_000005.pt").read_bytes()
    (truncated / "model_000005.pt").write_bytes(data[:len(data) // 2])
    reshaped = write_root_layout(tmp_path / "reshaped", model, tokenizer)
    meta = (reshaped / "meta_000005.json").read_text().replace('"n_embd": 128', '"n_embd": 192')
    (reshaped / "meta_000005.json").write_text(meta)
    no_tokenizer = write_root_layout(tmp_path / "no_tokenizer", model, tokenizer)
    (no_tokenizer / "tokenizer.pkl").unlink()
    newer = write_root_layout(tmp_path / "newer", model, tokenizer,
                              extra_keys={"value_embeds.0.weight": torch.zeros(4, 128)})
    cases = [(truncated, "model_000005.pt cannot be read"), (no_tokenizer, "not a nanochat checkpoint"),
             (newer, "value_embeds.0.weight, which this project's GPT does not have"), (good, "say which stage")]
    base_dir = tmp_path / "base"
    for folder, message in cases:
        proc = run_import(base_dir, folder)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not base_dir.exists()  # nothing written
    proc = run_import(base_dir, reshaped, "--stage", "base")
    assert proc.returncode != 0 and "has shape" in proc.stderr and not base_dir.exists()
    # a different tokenizer already there is never replaced silently
    other = RustBPETokenizer.train_from_iterator(iter(TEXTS[:1] * 10), 300)
    other.save(str(base_dir / "tokenizer"))
    proc = run_import(base_dir, good, "--stage", "base")
    assert proc.returncode != 0 and "holds another tokenizer" in proc.stderr
    assert sorted(p.name for p in base_dir.iterdir()) == ["tokenizer"]
    assert run_import(base_dir, good, "--stage", "base", "--replace-tokenizer").returncode == 0


def test_import_from_an_unreachable_hub_says_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.hf_import", "someone/nanochat-d99", "--stage", "base"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"), HF_HUB_OFFLINE="1"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot download someone/nanochat-d99 from the Hugging Face Hub" in proc.stderr
    assert "download it yourself and pass the folder" in proc.stderr and not (tmp_path / "base").exists()


# -----------------------------------------------------------------------------
# Upload: the staged repo, its card, and what happens without a token

def test_upload_dry_run_stages_a_repo_that_imports_back(chat_base_dir, tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(chat_base_dir))
    proc = subprocess.run([sys.executable, "-m", "scripts.hf_upload", "--source", "sft", "--model-tag", "d1",
                           "--repo-id", "someone/nanochat-d1", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "tokenizer/tokenizer.pkl",
                 "chatsft_checkpoints/d1/model_000000.pt"):
        assert f"  {name}  " in proc.stdout
    assert "library_name: transformers" in proc.stdout and "dry run: nothing was uploaded" in proc.stdout
    staged = chat_base_dir / "hf_upload" / "d1-sft-0"
    imported = run_import(tmp_path / "base", staged)  # the native files win over the export: exact
    assert imported.returncode == 0 and "(base_dir layout, step 0" in imported.stdout and "sft checkpoint" in imported.stdout
    no_token = subprocess.run([sys.executable, "-m", "scripts.hf_upload", "--source", "sft", "--model-tag", "d1",
                               "--repo-id", "someone/nanochat-d1"], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=dict(env, HF_TOKEN="", HF_HOME=str(tmp_path / "hf_home")))
    assert no_token.returncode != 0 and "huggingface-cli login" in no_token.stderr and "Traceback" not in no_token.stderr
