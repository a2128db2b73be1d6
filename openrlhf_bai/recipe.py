"""The BAI recipe and its arithmetic (arXiv 2509.00309).

    M_sft = sum_i w_i * M_i                      (stage 1, sum w_i = 1)
    M_bai = alpha * M_base + (1 - alpha) * M_sft  (stage 2)

Both stages are linear, so each output tensor is one weighted sum of the inputs:
    M_bai = alpha * M_base + sum_i (1 - alpha) * w_i * M_i
`coefficients()` gives those per-input weights (for provenance and the mergekit export); `combine_rows()`
computes the two stages in fp32 with one cast at the end. NumPy, not torch: the merge needs no torch import
(2 s of a 3 s merge) and bf16 is just the top half of a float32's bits.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np

from openrlhf_bai.errors import BAIError

DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}  # --dtype -> safetensors dtype
VOCAB_POLICIES = ("error", "renormalize")


@dataclass(frozen=True)
class BAIRecipe:
    """What to merge. Paths are local directories or Hugging Face hub ids."""

    base: str
    sft: tuple[str, ...]
    sft_weights: tuple[float, ...] | None = None  # None: equal weights
    alpha: float = 0.5  # share of the pretrained base in the actor
    dtype: str = "auto"  # auto: the base's dtype
    normalize: bool = False  # rescale sft_weights that do not sum to 1
    config_from: str | None = None  # input that supplies config, generation config; default: first SFT model
    tokenizer_from: str | None = None  # input that supplies tokenizer files; default: first SFT model
    # Embedding/lm_head rows that only some inputs have (an SFT model added tokens):
    # "error" refuses; "renormalize" merges each such row over the inputs that have it, weights rescaled to 1.
    vocab_mismatch: str = "error"
    max_shard_size: str = "5GB"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "sft", tuple(str(p) for p in self.sft))
        object.__setattr__(self, "base", str(self.base))
        if self.sft_weights is not None:
            object.__setattr__(self, "sft_weights", tuple(float(w) for w in self.sft_weights))

    def validate(self) -> None:
        """Raise BAIError for a recipe that cannot be merged, before any file is opened."""
        if not self.sft:
            raise BAIError("at least one SFT model is needed (--sft)")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise BAIError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.dtype not in ("auto", *DTYPES):
            raise BAIError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.vocab_mismatch not in VOCAB_POLICIES:
            raise BAIError(f"vocab_mismatch must be one of {', '.join(VOCAB_POLICIES)}; got {self.vocab_mismatch!r}")
        if self.sft_weights is not None:
            if len(self.sft_weights) != len(self.sft):
                raise BAIError(
                    f"{len(self.sft_weights)} SFT weights given for {len(self.sft)} SFT models; "
                    "give one weight per model"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.sft_weights):
                raise BAIError(f"SFT weights must be finite and non-negative, got {list(self.sft_weights)}")
            total = sum(self.sft_weights)
            if total <= 0:
                raise BAIError("SFT weights sum to 0")
            if not self.normalize and abs(total - 1.0) > 1e-6:
                raise BAIError(f"SFT weights sum to {total:g}, not 1; pass {spellings('normalize')} to rescale them")
        for name, value in (("config_from", self.config_from), ("tokenizer_from", self.tokenizer_from)):
            if value is not None and value not in (self.base, *self.sft):
                raise BAIError(f"{spellings(name)} must be the base or one of the SFT models, got {value!r}")

    def weights(self) -> tuple[float, ...]:
        """Stage-1 weights, equal by default, rescaled to sum to 1 when normalize is set."""
        w = self.sft_weights or tuple(1.0 / len(self.sft) for _ in self.sft)
        total = sum(w)
        return tuple(x / total for x in w)

    def coefficients(self) -> tuple[float, ...]:
        """Weight of each input in the output, in input order (base first, then the SFT models)."""
        return (self.alpha, *((1.0 - self.alpha) * w for w in self.weights()))

    def inputs(self) -> tuple[str, ...]:
        return (self.base, *self.sft)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["sft"] = list(self.sft)
        d["sft_weights"] = list(self.weights())
        d["coefficients"] = list(self.coefficients())
        d["config_from"] = self.config_from or self.sft[0]
        d["tokenizer_from"] = self.tokenizer_from or self.sft[0]
        return d


# ------------------------------------------------------------------------------------------- recipe flags
# The one table of the recipe's flags. `merge` and `probe` spell a field --max-shard-size, the launcher and a
# patched OpenRLHF's parser --bai.max_shard_size; all are built from here, defaults from BAIRecipe itself, so the
# same values give the same BAIRecipe, hence the same recipe hash and cache directory, from every front end.
RECIPE_FLAGS = {  # BAIRecipe field: argparse options (no default: BAIRecipe's)
    "base": dict(metavar="PATH", help="pretrained base model: local directory or hub id"),
    "sft": dict(nargs="+", metavar="PATH",
                help="SFT models, e.g. instruct then reasoning (launcher default: the actor path given to OpenRLHF)"),
    "sft_weights": dict(type=float, nargs="+", metavar="W", help="stage-1 weights, one per SFT model (default: equal)"),
    "normalize": dict(action="store_true", help="rescale SFT weights that do not sum to 1 (otherwise an error)"),
    "alpha": dict(type=float, metavar="A", help="share of the base in the actor (default %(default)s)"),
    "dtype": dict(choices=("auto", *DTYPES), help="dtype of the merged checkpoint (default auto: the base's)"),
    "max_shard_size": dict(metavar="SIZE",
                           help="shard size, as in transformers: 5GB, 500MB, 2GiB (default %(default)s)"),
    "config_from": dict(metavar="PATH", help="the input (the base or one of the SFT models) that supplies config.json "
                                             "and generation_config.json (default: the first SFT model)"),
    "tokenizer_from": dict(metavar="PATH", help="the input that supplies the tokenizer files (default: the first SFT "
                                                "model)"),
    "vocab_mismatch": dict(choices=VOCAB_POLICIES,
                           help="embedding rows only some inputs have (an SFT model added tokens): error refuses "
                                "(default), renormalize merges each row over the inputs that have it"),
}
_DEFAULTS = {f.name: None if f.default is MISSING else f.default for f in fields(BAIRecipe) if f.name in RECIPE_FLAGS}


def cli_flag(name: str) -> str:
    """The `merge` / `probe` spelling of a recipe field: --max-shard-size."""
    return "--" + name.replace("_", "-")


def bai_flag(name: str) -> str:
    """The launcher's (and a patched OpenRLHF's) spelling: --bai.max_shard_size."""
    return f"--bai.{name}"


def spellings(name: str) -> str:
    """For an error message that any front end may print."""
    return f"{cli_flag(name)} (launcher: {bai_flag(name)})"


def add_recipe_flags(parser, spell=cli_flag, skip=(), required=()) -> None:
    """Add the recipe's flags to an argparse parser or group, spelled by `spell` (cli_flag or bai_flag)."""
    for name, options in RECIPE_FLAGS.items():
        if name not in skip:
            parser.add_argument(spell(name), default=_DEFAULTS[name], required=name in required, **options)


def recipe_from_flags(values, **override) -> BAIRecipe:
    """The BAIRecipe of parsed recipe flags: `values` has the fields as attributes (merge's or probe's namespace,
    the launcher's args.bai; a field it lacks, like probe's alpha, takes BAIRecipe's default); `override` replaces
    some (the launcher's SFT model, by default the actor path)."""
    given = {name: getattr(values, name, _DEFAULTS[name]) for name in RECIPE_FLAGS}
    given.update(override)
    given["sft"] = tuple(given["sft"] or ())
    given["sft_weights"] = tuple(given["sft_weights"]) if given["sft_weights"] else None
    return BAIRecipe(**given)


def combine_rows(rows: list[np.ndarray], dtypes: list[str], owners: list[int], alpha: float,
                 weights: tuple[float, ...], out_dtype: str, scratch: np.ndarray | None = None
                 ) -> tuple[np.ndarray, bool]:
    """The two-stage formula in fp32, cast once: alpha * base + (1 - alpha) * sum_i w_i * sft_i.

    `rows` are flat arrays in their safetensors `dtypes`; `owners` says which input each is (0 = base, i = SFT
    model i). All inputs own ordinary rows; rows that only some inputs have (a grown vocabulary) are merged over
    their owners with the weights rescaled to 1. Returns the rows in `out_dtype` and whether all were finite.
    `scratch`: float32 work space of 2 x len(rows[0]) that the result then lives in (default: allocated here). The
    merge's threads reuse theirs: fresh memory from the OS (page faults, zeroing) costs more than the arithmetic.
    """
    sft = [(x, d, weights[k - 1]) for x, d, k in zip(rows, dtypes, owners) if k > 0]
    if len(sft) < len(weights):
        total = sum(w for _, _, w in sft)
        sft = [(x, d, w / total) for x, d, w in sft]
    n = rows[0].size
    scratch = np.empty(2 * n, dtype=np.float32) if scratch is None else scratch
    acc, tmp = scratch[:n], scratch[n:2 * n]
    if sft:
        to_fp32(*sft[0][:2], acc)
        acc *= np.float32(sft[0][2])
        for x, d, w in sft[1:]:
            acc += _scaled(to_fp32(x, d, tmp), w)
        if owners[0] == 0:
            acc *= np.float32(1.0 - alpha)
            acc += _scaled(to_fp32(rows[0], dtypes[0], tmp), alpha)
    else:  # rows only the base has
        to_fp32(rows[0], dtypes[0], acc)
    finite = bool(np.isfinite(acc, out=tmp.view(np.bool_)[:n]).all())
    out = from_fp32(acc, out_dtype, tmp)
    return out, finite and (out_dtype != "F16" or bool(np.isfinite(out).all()))


def _scaled(x: np.ndarray, c: float) -> np.ndarray:
    x *= np.float32(c)
    return x


def to_fp32(x: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Widen into `out` (float32). Exact for bf16 and fp16: a bf16 value is the top half of a float32's bits."""
    if dtype == "BF16":
        bits = out.view(np.uint32)
        np.copyto(bits, x)  # widen, then shift in place: faster than a shift that casts on the way
        bits <<= np.uint32(16)
    else:
        out[...] = x
    return out


def from_fp32(acc: np.ndarray, dtype: str, tmp: np.ndarray) -> np.ndarray:
    """Cast once, rounding to nearest with ties to even as torch does. Consumes `acc`; the result lives in `tmp`
    (float32, as long as `acc`), or is `acc` itself for fp32."""
    if dtype == "F32":
        return acc
    out = tmp.view(np.float16 if dtype == "F16" else np.uint16)[: acc.size]
    if dtype == "F16":
        np.copyto(out, acc, casting="same_kind")
        return out
    bits = acc.view(np.uint32)
    odd = np.right_shift(bits, np.uint32(16), out=tmp.view(np.uint32))  # in place: a temporary is another pass
    odd &= np.uint32(1)
    odd += np.uint32(0x7FFF)
    bits += odd
    bits >>= np.uint32(16)
    np.copyto(out, bits, casting="unsafe")  # the top 16 bits, now in the low half
    return out


def to_mergekit_yaml(recipe: BAIRecipe, out_dtype: str) -> str:
    """The equivalent one-stage mergekit linear merge (stage 1 and 2 folded into per-model weights)."""
    mk_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[out_dtype]
    lines = ["merge_method: linear", f"dtype: {mk_dtype}", "parameters:", "  normalize: false", "models:"]
    for path, coef in zip(recipe.inputs(), recipe.coefficients()):
        lines += [f"  - model: {path}", "    parameters:", f"      weight: {coef!r}"]
    src = recipe.tokenizer_from or recipe.sft[0]
    lines += [f"tokenizer_source: {src}", ""]
    return "\n".join(lines)
