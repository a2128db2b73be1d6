"""Let OpenRLHF import on a machine without CUDA.

OpenRLHF imports flash_attn at module level but only uses `flash_attn.bert_padding`, which is plain PyTorch.
flash-attn's package __init__ loads its CUDA kernels and fails without a GPU. Registering the package's module
object without running that __init__ makes the submodules importable. On a GPU machine with a working
flash-attn this does nothing.
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
