"""`openrlhf-bai probe`: measure candidate alphas before an RL run (the recipe; the CLI is openrlhf_bai.cli.probe).

For each alpha the candidate is merged into the shared cache (the directory `--actor_init bai` reuses), then:
  mean_length / median_length  generated tokens per response, the EOS token counted
  eos_rate                     share of responses that stop on an EOS token within max_new_tokens
  kl[parent]                   KL(candidate || parent) per generated token, both models teacher-forced on the
                               candidate's own responses; one parent per input of the merge (base, sft[1], ...)
  perplexity                   on a held-out text: how much of the base's knowledge is kept
The base and the reasoning SFT model are measured the same way as reference rows.

suggest(): the most SFT-heavy (smallest) alpha whose mean length is at least `min_length_share` of the
reasoning SFT model's and whose KL to the base is at most `max_kl_base_share` of the reasoning SFT model's
own KL to the base. Both bounds are relative to the reasoning SFT so the defaults mean the same for any model size.
"""

from __future__ import annotations

import gc
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch

from openrlhf_bai.atomic import check_output_file, write_text_atomic
from openrlhf_bai.diagnostics.plot import figure_format, save_figure
from openrlhf_bai.errors import BAIError
from openrlhf_bai.recipe import BAIRecipe

MIN_LENGTH_SHARE = 0.8  # candidate mean length >= this share of the reasoning SFT's: no collapse to come
MAX_KL_BASE_SHARE = 0.5  # candidate KL to base <= this share of the reasoning SFT's KL to base: still balanced
PERPLEXITY_BLOCK = 1024  # held-out text is scored in blocks of this many tokens (or the model's context, if shorter)


# ---------------------------------------------------------------------------------------------------- inputs


def load_prompts(path, input_key: str, tokenizer, apply_chat_template: bool, input_template: str | None = None,
                 limit: int | None = None) -> list[str]:
    """Prompt texts from an OpenRLHF prompt dataset (JSONL), made by OpenRLHF's own preprocess_data so the file
    used for training gives the same prompts here."""
    from openrlhf_bai.integration.flash_attn_cpu import make_flash_attn_importable

    make_flash_attn_importable()
    try:
        from openrlhf.datasets.prompts_dataset import preprocess_data
    except ImportError as e:
        raise BAIError(f"probe reads prompts with OpenRLHF's own code, which is not importable ({e}); "
                       "pip install 'openrlhf-bai[openrlhf]'")

    path = Path(path)
    if not path.is_file():
        raise BAIError(f"prompts file not found: {path}")
    if input_template is not None:
        try:
            input_template.format("")
        except (KeyError, IndexError, ValueError):
            raise BAIError(f"--input-template {input_template!r}: a format string with one {{}} for the prompt, and "
                           "literal braces doubled ({{ }})") from None
    if apply_chat_template and not tokenizer.chat_template:
        raise BAIError("--apply-chat-template: the tokenizer the merge takes has no chat template")
    template = tokenizer.apply_chat_template if apply_chat_template else None
    prompts = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise BAIError(f"{path}:{lineno}: not valid JSON ({e.msg})")
            if not isinstance(data, dict) or input_key not in data:
                raise BAIError(f"{path}:{lineno}: no key {input_key!r} (set --input-key)")
            if isinstance(data[input_key], list) and not apply_chat_template:
                raise BAIError(f"{path}:{lineno}: {input_key!r} is a list of messages; pass --apply-chat-template")
            try:
                prompt, _ = preprocess_data(data, input_template, input_key, None, template)
            except Exception as e:  # the user's data meets OpenRLHF's code and the chat template's Jinja
                raise BAIError(f"{path}:{lineno}: cannot make a prompt of {input_key!r} ({type(e).__name__}: "
                               f"{_first_line(e)})") from None
            if not isinstance(prompt, str):
                raise BAIError(f"{path}:{lineno}: {input_key!r} is {type(data[input_key]).__name__}, not text")
            prompts.append(prompt)
            if limit and len(prompts) == limit:
                break
    if not prompts:
        raise BAIError(f"prompts file {path} holds no prompts")
    return prompts


def eos_token_ids(model_dir: Path, tokenizer) -> list[int]:
    """The ids that end a response: the generation config's (or config's) eos_token_id plus the tokenizer's."""
    ids = set()
    for name in ("generation_config.json", "config.json"):
        file = Path(model_dir) / name
        if file.is_file():
            try:
                value = json.loads(file.read_bytes()).get("eos_token_id")
            except (ValueError, AttributeError):
                raise BAIError(f"{file}: not a JSON object") from None
            if value is not None:
                value = value if isinstance(value, list) else [value]
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    raise BAIError(f"{file}: eos_token_id {value!r} is not a token id")
                ids.update(value)
                break
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise BAIError(f"no eos_token_id in {model_dir} nor in its tokenizer; cannot tell finished responses")
    return sorted(ids)


def read_heldout(path, tokenizer, max_tokens: int) -> list[int]:
    path = Path(path)
    if not path.is_file():
        raise BAIError(f"held-out text file not found: {path}")
    ids = tokenizer(_utf8(path.read_bytes(), str(path)))["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise BAIError(f"held-out text file {path} has fewer than 2 tokens")
    return ids


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BAIError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       "save the file as UTF-8") from None


# ------------------------------------------------------------------------------------------------ generation


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype="auto").to(device()).eval()


@torch.no_grad()
def generate_hf(model, prompt_ids: list[list[int]], max_new_tokens: int, eos_ids: list[int], pad_id: int,
                temperature: float = 0.0, seed: int = 42, batch_size: int = 8) -> list[dict]:
    """transformers generate, left-padded batches. Each result: response token ids (cut after the first EOS,
    which is kept) and whether it stopped on EOS."""
    from transformers import GenerationConfig

    # An explicit config, so a checkpoint's own sampling defaults (generation_config.json) do not apply.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, eos_token_id=eos_ids,
                              pad_token_id=pad_id, **({"temperature": temperature, "top_p": 1.0, "top_k": 0}
                                                      if temperature > 0 else {}))
    torch.manual_seed(seed)
    results = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start:start + batch_size]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), None)
            results.append({"response": row[:end] if end else row, "eos": end is not None})
    return results


def generate_vllm(model_dir, tokenizer_dir, prompt_ids: list[list[int]], max_new_tokens: int, eos_ids: list[int],
                  temperature: float = 0.0, seed: int = 42) -> list[dict]:
    """vLLM generation in a spawned process: its exit gives all GPU memory back before the next model loads."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_vllm_worker, str(model_dir), str(tokenizer_dir), prompt_ids, max_new_tokens, eos_ids,
                           temperature, seed).result()


def _vllm_worker(model_dir, tokenizer_dir, prompt_ids, max_new_tokens, eos_ids, temperature, seed):
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, tokenizer=tokenizer_dir, dtype="auto", seed=seed, enforce_eager=True,
              max_model_len=max(map(len, prompt_ids)) + max_new_tokens)
    params = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, seed=seed,
                            stop_token_ids=eos_ids, skip_special_tokens=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    # vLLM keeps the stop token in token_ids; "stop" is an EOS / stop token (checked before the length cap).
    return [{"response": list(o.outputs[0].token_ids), "eos": o.outputs[0].finish_reason == "stop"} for o in outputs]


# --------------------------------------------------------------------------------------------------- metrics


def response_stats(generations: list[dict]) -> dict:
    lengths = [len(g["response"]) for g in generations]
    return {
        "mean_length": sum(lengths) / len(lengths),
        "median_length": float(statistics.median(lengths)),
        "eos_rate": sum(g["eos"] for g in generations) / len(generations),
    }


def _response_logprobs(model, batch: list[tuple[list[int], list[int]]], pad_id: int) -> list[torch.Tensor]:
    """log-softmax (fp32) at the positions that predict each response token, one [len(response), vocab] per pair.
    Right padding: real tokens keep their positions, so no position_ids are needed."""
    seqs = [p + r for p, r in batch]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=model.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    return [torch.log_softmax(logits[i, len(p) - 1:len(p) + len(r) - 1].float(), dim=-1)
            for i, (p, r) in enumerate(batch)]


@torch.no_grad()
def token_kl(model, parent, prompt_ids: list[list[int]], generations: list[dict], pad_id: int,
             batch_size: int = 8) -> float:
    """Mean over all generated tokens of KL(model || parent) = sum_v p(v) (log p(v) - log q(v))."""
    pairs = [(p, g["response"]) for p, g in zip(prompt_ids, generations) if g["response"]]
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        for lp, lq in zip(_response_logprobs(model, batch, pad_id), _response_logprobs(parent, batch, pad_id)):
            total += (lp.exp() * (lp - lq)).sum().item()
            count += lp.shape[0]
    return total / count


@torch.no_grad()
def perplexity(model, token_ids: list[int]) -> float:
    """exp(mean next-token NLL) over the held-out tokens, scored in independent blocks."""
    block = min(PERPLEXITY_BLOCK, getattr(model.config, "max_position_embeddings", PERPLEXITY_BLOCK))
    nll, count = 0.0, 0
    for start in range(0, len(token_ids), block):
        chunk = token_ids[start:start + block]
        if len(chunk) < 2:
            continue
        ids = torch.tensor([chunk], device=model.device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += len(chunk) - 1
    return math.exp(nll / count)


# ------------------------------------------------------------------------------------------------ suggestion


def suggest(candidates: list[dict], reasoning: dict, min_length_share: float = MIN_LENGTH_SHARE,
            max_kl_base_share: float = MAX_KL_BASE_SHARE) -> dict:
    """The smallest alpha whose mean_length >= min_length_share * reasoning mean_length and whose
    kl['base'] <= max_kl_base_share * reasoning kl['base']. Rows need alpha, mean_length and kl['base']."""
    min_length = min_length_share * reasoning["mean_length"]
    max_kl = max_kl_base_share * reasoning["kl"]["base"]
    checks = []
    for row in sorted(candidates, key=lambda r: r["alpha"]):
        checks.append({"alpha": row["alpha"], "length_ok": row["mean_length"] >= min_length,
                       "kl_ok": row["kl"]["base"] <= max_kl})
    chosen = next((c["alpha"] for c in checks if c["length_ok"] and c["kl_ok"]), None)
    if chosen is not None:
        message = f"suggested alpha: {chosen:g}"
    else:
        message = "no alpha meets both bounds; " + "; ".join(
            f"alpha {c['alpha']:g}: " + ", ".join(
                ([] if c["length_ok"] else ["length too short"]) + ([] if c["kl_ok"] else ["KL to base too high"]))
            for c in checks)
    return {"alpha": chosen, "min_length": min_length, "max_kl_base": max_kl, "min_length_share": min_length_share,
            "max_kl_base_share": max_kl_base_share, "checks": checks, "message": message}


# ------------------------------------------------------------------------------------------------- reporting


def format_table(rows: list[dict], parents: list[str]) -> str:
    head = ["model", "alpha", "mean_len", "median_len", "eos_rate", *(f"kl[{p}]" for p in parents), "ppl"]
    body = [[r["label"], "-" if r["alpha"] is None else f"{r['alpha']:g}", f"{r['mean_length']:.1f}",
             f"{r['median_length']:.1f}", f"{r['eos_rate']:.2f}", *(f"{r['kl'][p]:.4g}" for p in parents),
             "-" if r["perplexity"] is None else f"{r['perplexity']:.2f}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body])


def plot(rows: list[dict], parents: list[str], path: Path) -> None:
    """Length, EOS rate and KL against alpha; the reference models (base, reasoning SFT) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = sorted((r for r in rows if r["kind"] == "candidate"), key=lambda r: r["alpha"])
    alphas = [r["alpha"] for r in cands]
    fig, (ax_len, ax_eos, ax_kl) = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in ((ax_len, "mean_length", "mean response length (tokens)"), (ax_eos, "eos_rate", "EOS rate")):
        ax.plot(alphas, [r[key] for r in cands], marker="o", label="candidates")
        for ref, style in zip((r for r in rows if r["kind"] != "candidate"), ("--", ":")):
            ax.axhline(ref[key], linestyle=style, color="gray", label=ref["label"])
        ax.set(title=title, xlabel="alpha (share of base)")
        ax.legend(fontsize=8)
    for p in parents:
        ax_kl.plot(alphas, [r["kl"][p] for r in cands], marker="o", label=p)
    ax_kl.set(title="KL(candidate || parent) per token", xlabel="alpha (share of base)")
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ the probe


def measure_model(path, prompt_ids, parents: dict[str, str], *, engine, tokenizer_dir, max_new_tokens, eos_ids,
                  pad_id, temperature, seed, batch_size, heldout_ids=None) -> dict:
    """One row of the table: generate, then length / EOS stats, perplexity and KL to each parent.
    At most two models are in memory: this one and one parent."""
    if engine == "vllm":
        generations = generate_vllm(path, tokenizer_dir, prompt_ids, max_new_tokens, eos_ids, temperature, seed)
    model = load_model(path)
    if engine == "hf":
        generations = generate_hf(model, prompt_ids, max_new_tokens, eos_ids, pad_id, temperature, seed, batch_size)
    row = response_stats(generations)
    row["perplexity"] = perplexity(model, heldout_ids) if heldout_ids else None
    row["kl"] = {}
    for name, parent_path in parents.items():
        if _same_dir(parent_path, path):
            row["kl"][name] = 0.0  # the model itself
            continue
        parent = load_model(parent_path)
        row["kl"][name] = token_kl(model, parent, prompt_ids, generations, pad_id, batch_size)
        del parent
    del model
    if torch.cuda.is_available():  # hand cached blocks back: the next vLLM process sizes itself from free memory
        gc.collect()
        torch.cuda.empty_cache()
    row["generations"] = generations
    return row


def _log(msg: str) -> None:
    print(f"probe: {msg}", file=sys.stderr, flush=True)


def run_probe(recipe: BAIRecipe, alphas: list[float], prompts_file, *, reasoning_sft: str | None = None,
              input_key="input", input_template=None, apply_chat_template=False,
              num_prompts: int | None = None, max_new_tokens=256, temperature=0.0, seed=42, engine="auto",
              batch_size=8, heldout=None, heldout_max_tokens=16384, min_length_share=MIN_LENGTH_SHARE,
              max_kl_base_share=MAX_KL_BASE_SHARE, plot_path=None, json_path=None) -> dict:
    """Check everything, merge the candidates (`recipe` at each alpha), measure every row, suggest an alpha;
    write the plot and JSON."""
    from transformers import AutoTokenizer

    from openrlhf_bai.merger import cache_dir_for, existing_merge_hash, existing_parent, merge, plan_merge

    bad = [a for a in alphas if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
    if bad:
        raise BAIError(f"alphas must be in [0, 1], got {', '.join(f'{a:g}' for a in bad)}")
    alphas = sorted(set(alphas), reverse=True)
    for name, value in (("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size),
                        ("--num-prompts", num_prompts or 1), ("--heldout-max-tokens", heldout_max_tokens)):
        if value < 1:
            raise BAIError(f"{name} must be at least 1, got {value}")
    for name, value in (("--temperature", temperature), ("--min-length-share", min_length_share),
                        ("--max-kl-base-share", max_kl_base_share)):
        if not (math.isfinite(value) and value >= 0):
            raise BAIError(f"{name} must be a number >= 0, got {value}")
    engine = _pick_engine(engine)
    # Every output checked before any merge or generation: writable, not an input, and not inside an input.
    inputs = [p for p in (prompts_file, heldout, *recipe.inputs(), reasoning_sft) if p and os.path.exists(p)]
    if plot_path is not None and json_path is not None and os.path.abspath(plot_path) == os.path.abspath(json_path):
        raise BAIError(f"--plot and --json name the same file {plot_path}; give two paths")
    if plot_path is not None:
        check_output_file(plot_path, inputs, "--plot")
        figure_format(plot_path)
    if json_path is not None:
        check_output_file(json_path, inputs, "--json")

    recipes = [dataclasses.replace(recipe, alpha=a) for a in alphas]
    plans = [plan_merge(r) for r in recipes]  # every merge check, before any merging
    plan = plans[0]
    tokenizer_dir = plan.inputs[plan.tokenizer_src].directory
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # transformers raises OSError, ValueError, ... for a missing or broken tokenizer
        raise BAIError(f"cannot load the tokenizer of {tokenizer_dir} ({type(e).__name__}: {_first_line(e)}); "
                       "choose another input with --tokenizer-from") from None
    eos_ids = eos_token_ids(plan.inputs[plan.config_src].directory, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompts = load_prompts(prompts_file, input_key, tokenizer, apply_chat_template, input_template, num_prompts)
    # As OpenRLHF's rollout does: the (templated) prompt text is tokenized without adding special tokens.
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if not all(prompt_ids):
        raise BAIError(f"prompt {prompt_ids.index([]) + 1} of {prompts_file} is empty")
    heldout_ids = read_heldout(heldout, tokenizer, heldout_max_tokens) if heldout else None
    parents = {"base": str(plan.inputs[0].directory)}
    parents.update({f"sft[{i + 1}]": str(c.directory) for i, c in enumerate(plan.inputs[1:])})
    reasoning_path = _reasoning_path(reasoning_sft, list(recipe.sft), list(parents.values())[1:])

    out_dirs = [cache_dir_for(r, p) for r, p in zip(recipes, plans)]
    needed = sum(p.bytes_to_write for p, d in zip(plans, out_dirs) if existing_merge_hash(d) != p.recipe_hash)
    free = shutil.disk_usage(existing_parent(out_dirs[0])).free
    if needed > free:
        raise BAIError(f"not enough disk for the candidates in {out_dirs[0].parent}: "
                       f"{needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")

    rows = [{"label": "base", "kind": "base", "alpha": 1.0, "path": parents["base"]}]
    for recipe, p, out in zip(recipes, plans, out_dirs):
        _log(f"alpha {recipe.alpha:g}: merging into {out}")
        path = merge(recipe, out, plan=p, progress=False)
        rows.append({"label": f"alpha={recipe.alpha:g}", "kind": "candidate", "alpha": recipe.alpha, "path": str(path)})
    rows.append({"label": "reasoning sft", "kind": "reasoning", "alpha": None, "path": reasoning_path})

    for row in rows:
        _log(f"{row['label']}: generating {len(prompt_ids)} responses ({engine}) and measuring")
        row.update(measure_model(row["path"], prompt_ids, parents, engine=engine, tokenizer_dir=tokenizer_dir,
                                 max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                                 temperature=temperature, seed=seed, batch_size=batch_size, heldout_ids=heldout_ids))

    reasoning = rows[-1]
    suggestion = suggest([r for r in rows if r["kind"] == "candidate"], reasoning, min_length_share, max_kl_base_share)
    result = {
        "settings": {"base": parents["base"], "sft": list(parents.values())[1:],
                     "sft_weights": list(plan.recipe.weights()),
                     "reasoning_sft": reasoning_path, "prompts": str(prompts_file), "num_prompts": len(prompts),
                     "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "engine": engine,
                     "heldout": str(heldout) if heldout else None, "eos_token_ids": eos_ids},
        "parents": parents, "rows": rows, "suggestion": suggestion,
        "table": format_table(rows, list(parents)),
    }
    if plot_path is not None:
        plot(rows, list(parents), Path(plot_path))
    if json_path is not None:  # the numbers; the generated token ids stay in the returned rows only
        numbers = {**result, "rows": [{k: v for k, v in r.items() if k != "generations"} for r in rows]}
        write_text_atomic(json_path, json.dumps(numbers, indent=2) + "\n")
    return result


def _pick_engine(engine: str) -> str:
    """auto: vLLM when a GPU and vllm are present, transformers otherwise."""
    import importlib.util

    if engine == "hf":
        return engine
    if not torch.cuda.is_available():
        if engine == "vllm":
            raise BAIError("--engine vllm needs a CUDA GPU and none is visible; use --engine hf")
        return "hf"
    if importlib.util.find_spec("vllm") is None:
        if engine == "vllm":
            raise BAIError("--engine vllm needs the vllm package, which is not installed; use --engine hf")
        return "hf"
    return "vllm"


def _reasoning_path(value: str | None, sft: list[str], sft_dirs: list[str]) -> str:
    """--reasoning-sft: a 1-based index into --sft (as in the labels sft[1], sft[2]) or a path; default the last."""
    if value is None:
        return sft_dirs[-1]
    if value.isdigit():
        if not 1 <= int(value) <= len(sft):
            raise BAIError(f"--reasoning-sft {value}: there are {len(sft)} SFT models (index 1..{len(sft)})")
        return sft_dirs[int(value) - 1]
    if value in sft:
        return sft_dirs[sft.index(value)]
    if not (Path(value).expanduser() / "config.json").is_file():
        raise BAIError(f"--reasoning-sft {value}: not an index into --sft nor a checkpoint directory")
    return str(Path(value).expanduser().resolve())


def _same_dir(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
