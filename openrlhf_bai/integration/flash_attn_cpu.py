"""Let OpenRLHF import on a machine without CUDA.

OpenRLHF imports flash_attn at module level but only uses `flash_attn.bert_padding`, which is plain PyTorch.
flash-attn's package __init__ loads its CUDA kernels and fails without a GPU. Registering the package's module
object without running that __init__ makes the submodules importable. Its Triton cross-entropy kernel imports
but needs CUDA when called, so it is marked missing: OpenRLHF then takes its own PyTorch fallback
(log_probs_from_logits catches the ImportError). On a GPU machine with a working flash-attn this does nothing.
"""

import importlib.util
import sys


def make_flash_attn_importable() -> None:
    if "flash_attn" in sys.modules:
        return
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        spec = importlib.util.find_spec("flash_attn")
        if spec is not None:
            sys.modules["flash_attn"] = importlib.util.module_from_spec(spec)
            sys.modules["flash_attn.ops.triton.cross_entropy"] = None  # `import` of it raises ImportError
