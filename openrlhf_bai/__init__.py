"""Balanced Actor Initialization (arXiv 2509.00309) for OpenRLHF.

Exports are imported on first use, so `import openrlhf_bai` (and the CLI) does not pay for torch or OpenRLHF.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BAIRecipe": "openrlhf_bai.recipe",
    "merge": "openrlhf_bai.merger",
    "install_hooks": "openrlhf_bai.integration.worker",
    "ray_runtime_env": "openrlhf_bai.integration.worker",
    "register_callback": "openrlhf_bai.integration.hooks",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'openrlhf_bai' has no attribute {name!r}")
