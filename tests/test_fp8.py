"""
nanochat/fp8.py: --fp8 swaps the block matrices for torchao's Float8Linear (the module swap and
a training step run on CPU, where torch emulates the fp8 matmul), keeps checkpoints loadable
without fp8, and is refused by name where fp8 tensor cores are missing.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nanochat.fp8 import convert_blocks_to_fp8, fp8_unsupported_reason
from nanochat.gpt import GPT, GPTConfig

pytest.importorskip("torchao.float8")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab_size=512, sequence_len=64))
    model.init_weights()
    return model


def test_only_the_block_matrices_are_swapped_and_state_dict_is_unchanged():
    model = tiny_gpt()
    params, keys = [id(p) for p in model.parameters()], set(model.state_dict())
    assert convert_blocks_to_fp8(model) == 2 * 6  # c_q, c_k, c_v, c_proj, c_fc, mlp c_proj per layer
    assert all(isinstance(m, Float8Linear) for m in model.transformer.h.modules() if isinstance(m, nn.Linear))
    assert type(model.lm_head) is nn.Linear and type(model.transformer.wte) is nn.Embedding
    assert [id(p) for p in model.parameters()] == params  # the optimizers' tensors stay the same
    assert set(model.state_dict()) == keys
    plain = tiny_gpt(seed=1)
    plain.load_state_dict(model.state_dict())  # a checkpoint trained in fp8 loads without it


def test_an_fp8_training_step_runs_and_stays_close_to_full_precision():
    """On CPU torch emulates the fp8 matmul; the loss of the first step differs from fp32 by the
    e4m3 rounding of the matmul inputs (3 mantissa bits): within 2% here."""
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    reference = tiny_gpt()(x, x).item()
    model = tiny_gpt()
    convert_blocks_to_fp8(model)
    try:
        loss = model(x, x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch cannot emulate fp8 matmuls on CPU: {e}")
    loss.backward()
    assert abs(loss.item() / reference - 1) < 0.02
    grads = [p.grad for p in model.transformer.h.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_refused_without_fp8_tensor_cores(monkeypatch):
    assert "needs an NVIDIA GPU of compute capability 8.9" in fp8_unsupported_reason(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "sm_80; fp8 tensor cores start at sm_89" in fp8_unsupported_reason(torch.device("cuda"))
    for capability in ((8, 9), (9, 0), (12, 1)):  # Ada, Hopper, GB10
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert fp8_unsupported_reason(torch.device("cuda")) is None


def test_base_train_refuses_fp8_on_cpu_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", "--fp8", "--depth", "2"], cwd=REPO,
                          env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "base_train: --fp8: fp8 training needs an NVIDIA GPU" in proc.stderr
