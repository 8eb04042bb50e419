"""
fp8 training of the Transformer blocks' matrices with torchao's float8 recipe (tensorwise
dynamic scaling: one scale per tensor, computed every step; e4m3 for weights and activations,
e5m2 for their gradients). The matmuls run on the fp8 tensor cores of sm_89 and newer GPUs
(Ada, Hopper, Blackwell); everything else (embedding, lm_head, norms, attention's softmax, the
optimizers and the fp32 master weights) stays as it is.

Why only the blocks, and tensorwise: upstream nanochat measured +17% tok/s at d26 on 8 x H100
with torchao's tensorwise recipe on its Linear layers and a loss (0.90x) with rowwise
(karpathy/nanochat dev/LOG.md, the fp8 entry); fp8 on lm_head alone gained ~1% and cost memory.
torch.compile is required for the gain: unfused, the scaling ops make fp8 several times slower.

Not for: inference (checkpoints hold the fp32 weights under the same names as without fp8, so
every later stage, the Engine and exports load them as usual), or any scaling code of our own.
"""

import torch
import torch.nn as nn


def fp8_unsupported_reason(device):
    """Why this process cannot train in fp8 on `device` (torch.device), or None when it can:
    a CUDA GPU of compute capability >= 8.9 and torchao importable."""
    if device.type != "cuda":
        return (f"fp8 training needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                f"this run is on {device.type}. Drop --fp8")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} is sm_{capability[0]}{capability[1]}; fp8 tensor cores start "
                "at sm_89 (Ada, Hopper, Blackwell). Drop --fp8")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        return f"torchao is not importable ({e}); run ./setup.sh (it installs torchao) or drop --fp8"
    return None


def convert_blocks_to_fp8(model):
    """Swap the nn.Linear layers of model.transformer.h for torchao Float8Linear (tensorwise
    recipe), in place; the parameters stay the same tensors, so call it before building the
    optimizers or after, and state_dict keys do not change. Layers whose in/out features are not
    multiples of 16 are left alone (fp8 matmuls need them: torch._scaled_mm's requirement).

    Returns the number of layers converted. Raises ImportError when torchao is missing.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def is_fp8_friendly(module, fqn):
        return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model.transformer.h, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=is_fp8_friendly)
    from torchao.float8.float8_linear import Float8Linear
    return sum(isinstance(m, Float8Linear) for m in model.transformer.h.modules())
