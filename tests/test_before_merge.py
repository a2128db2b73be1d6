"""Said before it costs a GPU day: before merging, `--actor_init bai` prints the plan and warns, one line each, when
the input that supplies config and tokenizer would train differently from the actor the command names.

Real toy checkpoints (openrlhf_bai.toy); "today's actor" is a copy of the reasoning SFT model whose tokenizer was
saved with another chat template and EOS token, as a model trained with its own template is. Runs through the
launcher's real entry point (merge_only), and through init_actor on hierarchized args as a patched OpenRLHF calls it.
"""

import argparse
import json
import shutil
from pathlib import Path

import pytest

from openrlhf_bai.cli.train_ppo_ray import main
from openrlhf_bai.integration import launcher

TODAYS_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


@pytest.fixture(scope="module")
def todays_actor(llama_family, tmp_path_factory):
    """The reasoning SFT model as the team trains it today: same weights, its own chat template and EOS token."""
    actor = tmp_path_factory.mktemp("today") / "actor"
    shutil.copytree(llama_family["sft_reasoning"], actor)
    (actor / "chat_template.jinja").write_text(TODAYS_TEMPLATE)
    tokenizer_config = json.loads((actor / "tokenizer_config.json").read_text())
    (actor / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "eos_token": "<|end|>"}))
    generation = json.loads((actor / "generation_config.json").read_text())
    (actor / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 4}))
    return actor


def launch(capsys, family, actor, sft, *extra):
    """merge_only through the launcher: (stdout lines, warning lines on stderr)."""
    assert main(["--actor.model_name_or_path", str(actor), "--actor_init", "bai", "--bai.base", str(family["base"]),
                 "--bai.sft", *map(str, sft), *extra, "--bai.merge_only"]) == 0
    out, err = capsys.readouterr()
    return out.splitlines(), [line for line in err.splitlines() if line.startswith("openrlhf-bai: warning:")]


def test_config_and_tokenizer_from_another_model_warn_once_each_and_the_merge_goes_on(
        llama_family, todays_actor, capsys, tmp_path):
    instruct = llama_family["sft_instruct"]
    # Its own output directory: the same weights merged by another test would already sit in the shared cache.
    out, warnings = launch(capsys, llama_family, todays_actor, [instruct, todays_actor], "--data.max_len", "512",
                           "--bai.output_dir", str(tmp_path / "merged"))
    assert len(warnings) == 2, warnings
    template, eos = warnings
    assert template.startswith("openrlhf-bai: warning: chat template differs")
    assert f"sft[1] ({instruct})" in template and f"--bai.tokenizer_from {todays_actor}" in template
    assert "EOS token differs" in eos and "'<|endoftext|>' (ids [0])" in eos and "'<|end|>' (ids [4])" in eos
    # The plan comes first, the OpenRLHF command last: the merge happened.
    assert out[0].startswith("openrlhf-bai: BAI merge of 3 inputs (alpha 0.5)") and "free there" in out[0]
    merged = Path(out[-1].split("--actor.model_name_or_path ")[1].split()[0])
    assert (merged / "model.safetensors").is_file()


def test_the_actor_listed_first_supplies_config_and_tokenizer_and_nothing_is_said(llama_family, todays_actor, capsys):
    out, warnings = launch(capsys, llama_family, todays_actor, [todays_actor, llama_family["sft_instruct"]],
                           "--data.max_len", "512")
    assert warnings == []
    merged = Path(out[-1].split("--actor.model_name_or_path ")[1].split()[0])
    assert (merged / "chat_template.jinja").read_text() == TODAYS_TEMPLATE  # today's template travels with the merge

    # --bai.tokenizer_from / --bai.config_from name it just as well with another model first.
    _, warnings = launch(capsys, llama_family, todays_actor, [llama_family["sft_instruct"], todays_actor],
                         "--data.max_len", "512",
                         "--bai.tokenizer_from", str(todays_actor), "--bai.config_from", str(todays_actor))
    assert warnings == []


@pytest.mark.parametrize("lengths, said", [
    (["--data.max_len", "4096"], "(--data.max_len 4096)"),
    ([], "(--data.max_len 2048)"),  # OpenRLHF's default when the command does not say
    (["--prompt_max_len", "1024", "--generate_max_len", "3072"], "(--prompt_max_len + --generate_max_len 4096)"),
    (["--data.max_len", "512"], None),
])
def test_a_context_shorter_than_prompt_plus_generation_is_said(llama_family, capsys, lengths, said):
    reasoning = llama_family["sft_reasoning"]
    _, warnings = launch(capsys, llama_family, reasoning, [reasoning, llama_family["sft_instruct"]], *lengths)
    if said is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "max_position_embeddings is 512" in warnings[0] and said in warnings[0]


def test_a_patched_openrlhf_parser_gets_the_same_warnings(llama_family, todays_actor, tmp_path, capsys):
    """init_actor on OpenRLHF's hierarchized args, as the patch's --actor_init bai calls it."""
    from openrlhf.utils.config import hierarchize

    parser = argparse.ArgumentParser()
    parser.add_argument("--actor.model_name_or_path")
    parser.add_argument("--data.max_len", type=int, default=2048)  # as OpenRLHF 0.11's parser has it
    launcher.add_bai_arguments(parser)
    args = hierarchize(parser.parse_args([
        "--actor.model_name_or_path", str(todays_actor), "--actor.init", "bai", "--data.max_len", "8192",
        "--bai.base", str(llama_family["base"]), "--bai.sft", str(llama_family["sft_instruct"]), str(todays_actor),
        "--bai.output_dir", str(tmp_path / "merged"),
    ]))
    launcher.init_actor(args)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("openrlhf-bai: warning:")]
    assert [w.split(":")[2].strip().split(" ")[0] for w in warnings] == ["max_position_embeddings", "chat", "EOS"]
    assert args.actor.model_name_or_path == str(tmp_path / "merged")
