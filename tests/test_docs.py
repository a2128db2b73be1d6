"""Docs that cannot rot: the README's quickstart and the runnable blocks of docs/ run here, and the flags and log
formats the docs name are the ones the code knows, taken from the code itself.

- The README's ```bash quickstart``` block runs as written through the real launcher (`--bai.merge_only`), its hub
  ids resolved offline from a huggingface_hub cache laid out as the hub lays it out (blobs, snapshots, refs) that
  holds small real checkpoints under those names, with the context lengths and templates the real models have.
- Every ```bash runnable``` block of docs/ runs with bash in a scratch directory (exit status 0).
- Every --bai.* flag of the launcher's parser (add_bai_arguments) appears in docs/, and no other --bai.* flag appears
  in the README, docs/, examples/ or patches/; where a table gives a flag's default, it is the parser's.
- Every log format diagnose reads (readers.KINDS) is in docs/diagnose.md's table of RUN kinds, and nothing else is.
"""

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from openrlhf_bai.diagnostics.readers import KINDS
from openrlhf_bai.integration import launcher

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))  # docs/_incoming/ holds drafts not yet folded in
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FLAG = re.compile(r"--bai\.[A-Za-z_]+")

# What the README's hub ids are, as far as the launcher's checks see them: context length, chat template, EOS.
QWEN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
R1_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|><think>"
HUB_MODELS = {
    "Qwen/Qwen2.5-Math-7B": dict(seed=None, positions=4096, template=QWEN_TEMPLATE, eos="<|endoftext|>"),
    "Qwen/Qwen2.5-Math-7B-Instruct": dict(seed=1, positions=4096, template=QWEN_TEMPLATE, eos="<|end|>"),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": dict(seed=2, positions=131072, template=R1_TEMPLATE, eos="<|user|>"),
}


def docs_text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


def blocks(path: Path, info: str) -> list[str]:
    return [body for head, body in FENCE.findall(path.read_text()) if head.strip() == info]


def bai_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    launcher.add_bai_arguments(parser)
    return parser


def known_flags() -> dict[str, object]:
    """Every --bai.* option string of the launcher's parser, with its default."""
    return {option: action.default for action in bai_parser()._actions for option in action.option_strings
            if option.startswith("--bai.")}


def write_hub_cache(hub: Path) -> None:
    """The README's models as huggingface_hub's cache holds them: models--ORG--NAME/{blobs,snapshots,refs}, every file
    of a snapshot a symlink into blobs/. Small real Llama checkpoints (openrlhf_bai.toy) that differ from each other
    where the real ones do (config, tokenizer, generation config)."""
    from openrlhf_bai.toy import model_config, write_model, write_tokenizer

    staging = hub.parent / "staging"
    vocab = write_tokenizer(staging / "tokenizer")
    for repo, spec in HUB_MODELS.items():
        config = model_config("llama", vocab)
        config.max_position_embeddings = spec["positions"]
        files = write_model(staging / repo, config, seed=0, finetune_seed=spec["seed"],
                            tokenizer_dir=staging / "tokenizer")
        (files / "chat_template.jinja").write_text(spec["template"])
        tokenizer_config = json.loads((files / "tokenizer_config.json").read_text())
        (files / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "eos_token": spec["eos"]}))
        model = hub / f"models--{repo.replace('/', '--')}"
        commit = hashlib.sha1(repo.encode()).hexdigest()
        (model / "blobs").mkdir(parents=True)
        (model / "snapshots" / commit).mkdir(parents=True)
        (model / "refs").mkdir()
        (model / "refs" / "main").write_text(commit)
        for file in files.iterdir():
            blob = hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.move(str(file), model / "blobs" / blob)
            (model / "snapshots" / commit / file.name).symlink_to(Path("..", "..", "blobs", blob))
    shutil.rmtree(staging)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """(working directory, environment) in which the documented commands run: the README's hub ids offline from a
    hub cache, a private merge cache, `openrlhf-bai` on PATH, this checkout's tests/ beside it."""
    root = tmp_path_factory.mktemp("docs")
    write_hub_cache(root / "hub")
    work = root / "work"
    work.mkdir()
    (work / "tests").symlink_to(ROOT / "tests")  # the curve corpus the diagnose examples name
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1",
           "OPENRLHF_BAI_CACHE": str(root / "cache"), "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    return work, env


def shape(line: str) -> str:
    """A regular expression for lines like `line`, whatever their paths, sizes, counts and hashes."""
    parts = re.split(r"(\d+(?:\.\d+)? [MG]B|/[^\s()]+|\d+(?:\.\d+)?)", line)
    return "".join(r"\d+(?:\.\d+)? [MG]B" if re.fullmatch(r"\d+(?:\.\d+)? [MG]B", part) else r"/[^\s()]+"
                   if part.startswith("/") else r"\d+(?:\.\d+)?" if re.fullmatch(r"[\d.]+", part) else re.escape(part)
                   for part in parts)


def run_block(block: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_readme_quickstart_runs_as_written(scratch):
    work, env = scratch
    (quickstart,) = blocks(ROOT / "README.md", "bash quickstart")
    assert "--bai.merge_only" in quickstart
    proc = run_block(quickstart, work, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()

    # The plan before the merge, then the OpenRLHF command it would run, last.
    plan = next(line for line in out if line.startswith("openrlhf-bai: BAI merge of 3 inputs (alpha 0.5)"))
    assert "to write into" in plan and "free there" in plan
    command = shlex.split(out[-1])
    assert command[1:3] == ["-m", "openrlhf.cli.train_ppo_ray"]
    merged = Path(command[command.index("--actor.model_name_or_path") + 1])
    assert merged.parent == Path(env["OPENRLHF_BAI_CACHE"]) / "merged"
    assert command[command.index("--data.max_len") + 1] == "8192"  # the user's own flags pass through
    # What the README shows as its output, line by line, up to paths, sizes and counts.
    (shown,) = blocks(ROOT / "README.md", "text quickstart-output")
    assert [line for line in out if any(re.fullmatch(shape(s), line) for s in shown.splitlines())] == out, out
    assert len(out) == len(shown.splitlines())

    # The README lists today's actor first, so nothing needs saying, and today's template travels with the merge.
    assert "warning" not in proc.stderr, proc.stderr
    assert (merged / "chat_template.jinja").read_text() == R1_TEMPLATE
    recipe = json.loads((merged / "bai_recipe.json").read_text())["recipe"]
    assert recipe["coefficients"] == pytest.approx([0.5, 0.25, 0.25])

    # The command a user would write without reading about config_from: what the README says is warned about is.
    reordered = quickstart.replace(
        "--bai.sft deepseek-ai/DeepSeek-R1-Distill-Qwen-7B Qwen/Qwen2.5-Math-7B-Instruct",
        "--bai.sft Qwen/Qwen2.5-Math-7B-Instruct deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    assert reordered != quickstart
    proc = run_block(reordered, work, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("openrlhf-bai: warning:")]
    assert [w.split(":")[2].split()[0] for w in warnings] == ["max_position_embeddings", "chat", "EOS"], warnings


def test_the_runnable_blocks_of_docs_run(scratch):
    work, env = scratch
    runnable = [(path.name, block) for path in DOCS for block in blocks(path, "bash runnable")]
    assert len(runnable) >= 2
    for name, block in runnable:
        proc = run_block(block, work, env)
        assert proc.returncode == 0, f"{name}:\n{block}\n{proc.stderr[-3000:]}"


def test_every_bai_flag_the_code_knows_is_documented_and_no_other(scratch):
    flags = known_flags()
    assert len(flags) >= 20 and "--bai.merge_only" in flags
    text = docs_text()
    documented = set(FLAG.findall(text))
    assert sorted(set(flags) - documented) == [], "flags of the code that docs/ does not name"
    elsewhere = "\n".join(p.read_text() for p in [ROOT / "README.md", ROOT / "patches" / "README.md",
                                                 *(ROOT / "examples").rglob("*.sh")])
    assert sorted((documented | set(FLAG.findall(elsewhere))) - set(flags)) == [], "flags the code does not know"
    assert "--actor_init" in text


def test_defaults_in_the_docs_tables_are_the_parsers():
    defaults = known_flags()
    checked = 0
    for path in DOCS:
        header = None
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
            if cells is None:
                header = None
            elif header is None:
                header = [c.lower() for c in cells]
            elif "default" in header and cells[0].startswith("`--bai."):
                flag = FLAG.match(cells[0].strip("`")).group(0)
                cell = cells[header.index("default")]
                if re.fullmatch(r"`[^`]+`", cell):  # a literal, not words
                    literal, default = cell.strip("`"), defaults[flag]
                    same = (float(literal) == default if isinstance(default, (int, float)) and default is not None
                            and not isinstance(default, bool) else literal == str(default))
                    assert same, f"{path.name}: {flag} documented with default {literal}, the parser has {default!r}"
                    checked += 1
    assert checked >= 10


def test_every_log_format_diagnose_reads_is_documented_and_no_other():
    page = (ROOT / "docs" / "diagnose.md").read_text()
    table = page[page.index("| kind |"):]
    table = table[:table.index("\n\n")]  # the table of RUN kinds, up to the blank line after it
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = [re.match(r"\| `([^`]+)`", row).group(1) for row in rows]
    assert sorted(documented) == sorted(KINDS)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS]
    checked = 0
    for page in pages:
        text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))  # no link inside code, as Markdown reads it
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            assert linked.exists(), f"{page.name}: link to {target}: no such file"
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", FENCE.sub("", linked.read_text()), re.MULTILINE)
                assert anchor in {slug(h) for h in headings}, f"{page.name}: link to {target}: no such heading"
            checked += 1
    assert checked >= 20
