"""Fixtures the chat tests share (test_chat_web, test_ui, test_chat_cli): a NANOCHAT_BASE_DIR with
a tiny tokenizer and tiny chat models, and real chat_web servers on 127.0.0.1.

Not for: fixtures of one test module (they stay in that module).
"""

import os
from dataclasses import asdict

import pytest
import torch

from bench.serving import ChatWebServer, free_port  # noqa: F401  (free_port: for the test modules)
from nanochat.run_shape import PRESETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["The cat sat on the mat. Hello, how are you today? I am fine, thank you.",
         "Numbers like 12 and 345 add up: 12 + 345 = 357. Python prints results."] * 30
TINY_CONTEXT = PRESETS["tiny"]["base"]["max_seq_len"]  # what `speedrun_dgx.sh --tiny` trains: 512 tokens


def build_base_dir(base_dir):
    """A NANOCHAT_BASE_DIR with a small BPE tokenizer and three chat (sft) models at step 0:

    d1      1 layer, random init (near-uniform next token, so replies end on their own after ~100 tokens), context 256
    chatty  4 layers, crafted so it never samples <|assistant_end|> or <|bos|>, context 4096 (long, slower streams)
    tiny    1 layer, crafted like chatty, with the tiny preset's context (512): every reply runs until the context is full
    """
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import RustBPETokenizer
    tokenizer = RustBPETokenizer.train_from_iterator(iter(TEXTS), 400)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    vocab_size = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    for tag, sequence_len, n_layer, n_embd in (("d1", 256, 1, 64), ("chatty", 4096, 4, 128), ("tiny", TINY_CONTEXT, 1, 64)):
        model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=1, n_kv_head=1, n_embd=n_embd))
        model.init_weights()
        if tag in ("chatty", "tiny"):
            with torch.no_grad():  # a large constant feature 0 after the final norm; stop tokens read it negatively
                model.transformer.wte.weight[:, 0] = 20.0
                model.lm_head.weight.zero_()
                model.lm_head.weight[:, 0] = 1.0
                for name in ("<|assistant_end|>", "<|bos|>"):
                    model.lm_head.weight[tokenizer.encode_special(name), 0] = -1.0
        meta = {"model_config": asdict(model.config), "tokenizer_hash": tokenizer.content_hash()}
        save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", tag), 0, model.state_dict(), None, meta)


@pytest.fixture(scope="session")
def chat_base_dir(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("nanochat_chat")
    build_base_dir(str(base_dir))
    return base_dir


def Server(base_dir, *flags):
    """chat_web on 127.0.0.1 on the CPU with `flags` (bench.serving.ChatWebServer); .url, .log(), .stop()."""
    return ChatWebServer(base_dir, "--device-type", "cpu", *flags, timeout_s=120)


@pytest.fixture(scope="module")
def start_server(chat_base_dir):
    """start_server(*flags) -> a Server of chat_base_dir's models; every one still running stops after the module."""
    servers = []

    def start(*flags):
        servers.append(Server(chat_base_dir, *flags))
        return servers[-1]
    yield start
    for s in servers:
        s.stop()
