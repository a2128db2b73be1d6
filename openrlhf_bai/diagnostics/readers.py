"""Read a finished (or running) training run into (step, metrics) rows for the detectors.

Pure I/O: which kind of file a RUN is, and its per-step metrics under the names the framework logged them (the
detectors' *_KEYS know OpenRLHF's, verl's and TRL's names); only a logger's own `train/` prefix is removed.

Kinds:
- stdout: OpenRLHF's driver output, the line `PPOTrainer.fit` logs each step (behind Ray's `(PPOTrainer pid=...)`):
  `INFO 05-01 12:00:00 ppo_trainer.py:551] ✨ Global step 12: {'rollout/reward_mean': 0.41, ...}`
- verl: verl's console logger, `step:12 - actor/entropy:0.53 - critic/score/mean:0.41 - ...` (Ray prefixes and
  colour codes included).
- trl: the dicts a Hugging Face Trainer (TRL's GRPO/PPO trainers) prints, `{'loss': 0.01, 'reward': 0.41, ...}`.
  They carry no step: the n-th dict is step n x `logging_steps` (default 1: steps are log points).
- trainer-state: a Hugging Face Trainer's `trainer_state.json` (`log_history`, each entry with its `step`), or that list
  alone as scripts save it (`json.dump(trainer.state.log_history, f)`).
- tensorboard: a directory written by OpenRLHF's TensorboardLogger (`train/<name>` scalars), or one event file.
- wandb-csv / csv: a wandb CSV export (the run's history: `_step`, `train/global_step`, `train/...`; or a panel:
  `Step`, `<run> - train/...` with `__MIN`/`__MAX`), or any CSV with a step column.
- jsonl: the plugin's own log, or any JSON-lines file with a step key.
- console: a hand-written training loop's (or callback's) printed lines, one a step: the word `step` and its number
  (or a counter in brackets, MiniMind's `(10/9751)`), and `name=value` or `name: value` pairs (`[Step 12] reward=0.41
  completions/mean_length=311.2`, `GRPO step 10/500 | loss: 0.0001 | mean_reward: 0.78 | KL: 0.0001`,
  `Epoch:[1/1](10/9751), Reward: 0.38, Avg Response Len: 271.38`); lines with fewer than two pairs are not steps,
  and only the loop's own print is read (the most frequent form of line, with forms printed at its steps that name
  other metrics; not DeepSpeed's throughput lines). A log with both TRL's dicts and such lines is read as the one
  holding more values.
- notebook: a Jupyter notebook's saved outputs: the progress table a Trainer draws in the training cell
  (transformers' NotebookProgressCallback, with every logged metric as Unsloth draws it); where there is none, or it
  shows the loss alone, the Trainer dicts or console lines it printed, whichever hold more values.
"""

from __future__ import annotations

import csv
import html as htmllib
import io
import json
import math
import re
from pathlib import Path

from openrlhf_bai.errors import BAIError

KINDS = ("stdout", "verl", "trl", "trainer-state", "tensorboard", "wandb-csv", "csv", "jsonl", "notebook", "console")
# read up to their last newline (_read_lines)
LINE_KINDS = ("stdout", "verl", "trl", "wandb-csv", "csv", "jsonl", "console")
EXPECTED = (
    "an OpenRLHF stdout log ('✨ Global step N: {...}'), a verl console log ('step:N - key:value - ...'), "
    "a TRL/Hugging Face console log ({'loss': ...} lines) or trainer_state.json, a TensorBoard event directory, "
    "a CSV / JSONL file with a step column, a Jupyter notebook with its outputs, or printed lines with a step and "
    "name=value pairs ('[Step N] reward=0.4 kl=0.01')"
)

STEP_LINE = re.compile(r"Global step (\d+): (\{.*)$")
VERL_LINE = re.compile(r"(?:^|[\s)\]])step:(\d+) - (.*)$")
TRL_LINE = re.compile(r"(\{'[^{}]*\})\s*$")  # a flat Python dict at the end of a line (tqdm.write output)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# 'key': value inside the logged dict. A value may be wrapped (np.float64(0.5), tensor(0.5)); nan/inf are
# how Python prints non-finite floats. Non-numeric values (strings, lists) are skipped.
NUMBER = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf))"
# Newer transformers print the Trainer's values as strings ('loss': '-0.007415'): an optional quote around it.
DICT_ITEM = re.compile(r"'([^'\\]+)':\s*'?(?:[A-Za-z_][\w.]*\()?" + NUMBER + r"(?![\w.])")
VERL_ITEM = re.compile(r"([^\s:][^:]*?):(?:[A-Za-z_][\w.]*\()?" + NUMBER + r"\)?(?: - |\s*$)")
# A hand-written loop's line: the word "step" or "global_step" ([Step N], step: N, step N/500) and its whole number
# (not micro_step=40, nor Lightning's train_loss_step=1.460), or a step counter in brackets, as MiniMind prints it
# ("Epoch:[1/1](10/9751), Reward: ...") ...
CONSOLE_STEP = re.compile(r"(?:(?<![\w.])(?:global_)?step(?!\w)['\"]?\]?\s*[:=#]?\s*|\((?=\d+/\d+\)))"
                          r"(\d+)(?![.\d])(?:\s*/\s*\d+)?\]?", re.I)
DEEPSPEED_TIMER = re.compile(r"micro_step=\d+/global_step=\d+")  # its throughput line, every steps_per_print steps
# ... and name=value / name: value pairs (a space after the colon: a logger's "ppo_trainer.py:551]" is none; a name
# may hold spaces, "Avg Response Len: 271.38", or quotes, as in JSON with its step: {"step": 3, "logs": {...}}; a
# value may have thousands separators, "tok/sec: 4,883", and one with a decimal comma, "0,5", is not read).
CONSOLE_ITEM = re.compile(r"['\"]?([A-Za-z_][\w./-]*(?: [A-Za-z_][\w./-]*)*)['\"]?\s*(?:=\s*|:\s+)"
                          r"(?:[A-Za-z_][\w.]*\()?(\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|" + NUMBER[1:-1]
                          + r")(?![\w.]|,\d)")
NOTEBOOK_ROW = re.compile(r"<tr[^>]*>(.*?)</tr>", re.S)  # the table transformers' notebook callback draws
NOTEBOOK_CELL = re.compile(r"<t[hd][^>]*>(.*?)</t[hd]>", re.S)
NOTEBOOK_STEP = re.compile(r"<th[^>]*>\s*Step\s*</th>")  # its first header, in a notebook or pasted elsewhere
WANDB_STEP_COLUMNS = ("train/global_step", "Step", "_step")  # most exact first
STEP_KEYS = WANDB_STEP_COLUMNS + ("step", "global_step", "trainer/global_step",
                                  "current_steps",  # LLaMA-Factory's trainer_log.jsonl
                                  "global_step/max_steps")  # ms-swift's logging.jsonl: "12/500"
EVENT_FILE_GLOB = "*tfevents*"  # as TensorBoard: any file whose name holds "tfevents"
DETECT_BYTES = 4 << 20  # enough to get past a long start-up before the first logged step


def detect_kind(path: Path, step_key: str | None = None) -> str:
    if path.is_dir() or "tfevents" in path.name:
        return "tensorboard"
    head = _read_text(path, limit=DETECT_BYTES)
    first_line = next((line for line in head.splitlines() if line.strip()), "").strip()
    if path.suffix == ".ipynb" or first_line.startswith("{") and '"nbformat"' in head or NOTEBOOK_STEP.search(head):
        return "notebook"
    try:  # a JSON-lines log has a whole object on its first line; a trainer_state.json is one indented document
        first_object = json.loads(first_line) if first_line.startswith("{") else None
    except json.JSONDecodeError:
        first_object = None
    if isinstance(first_object, dict) and "log_history" not in first_object:
        return "jsonl"  # also ms-swift's logging.jsonl, whose closing summary holds the log_history
    list_start = re.match(r"\[\s*(\{|$)", first_line)  # not "[2026-03-17 09:54:59] WARNING ..."
    if first_line.startswith("{") and '"log_history"' in head or list_start and '"step"' in head:
        return "trainer-state"  # or the log_history list alone (json.dump(trainer.state.log_history, f))
    if first_line.startswith("{\""):
        return "jsonl"
    clean = ANSI_ESCAPE.sub("", head)
    if re.search(STEP_LINE.pattern, clean, re.MULTILINE):
        return "stdout"
    if re.search(VERL_LINE.pattern, clean, re.MULTILINE):
        return "verl"
    # A loop may print its own step lines and a Trainer-style dict once an epoch; a log may hold an SFT phase's
    # "step 10/611 loss=... lr=..." before the GRPO Trainer's dicts: of the two, the one holding more values is read.
    dicts, step_lines = _trl_rows(clean, 1), _console_rows(clean)
    if dicts or step_lines:
        return "trl" if _value_count(dicts) >= _value_count(step_lines) else "console"
    header = [column.strip() for column in next(csv.reader([first_line]), [])]
    if len(header) > 1:
        if any(column in WANDB_STEP_COLUMNS for column in header):
            return "wandb-csv"
        if any(column in (step_key, *STEP_KEYS) for column in header):
            return "csv"
        second = next((line for line in head.splitlines()[1:] if line.strip()), "")
        # A table, whose step column has a name of its own; not a log whose timestamps hold a comma
        # ("2025-06-20 05:18:00,305  INFO worker.py:1832 ...") nor lines of name=value pairs.
        named = not any(c[:1].isdigit() or "=" in c for c in header)
        if len(next(csv.reader([second]), [])) == len(header) and named:
            columns = ", ".join(header[:6]) + (", ..." if len(header) > 6 else "")
            raise BAIError(f"{path}: a CSV file without a step column (looked for {', '.join(STEP_KEYS)}); name "
                           f"it with --step-key (its columns: {columns})")
    raise BAIError(f"{path}: not a training log of a known format; expected {EXPECTED}")


def read_rows(path: str | Path, kind: str | None = None, step_key: str | None = None,
              logging_steps: int = 1) -> tuple[str, list[tuple[int, dict[str, float]]]]:
    """(kind, rows) of one RUN, rows in step order; `kind` forces the format instead of detecting it. `step_key`
    names the step column of a CSV / JSONL file; `logging_steps` turns TRL's n-th console dict into a step."""
    path = Path(path)
    if not path.exists():
        raise BAIError(f"{path}: no such file or directory; expected {EXPECTED}")
    kind = kind or detect_kind(path, step_key)
    if kind not in KINDS:
        raise BAIError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    readers = {
        "stdout": _read_stdout, "verl": _read_verl, "trl": lambda p: _read_trl(p, logging_steps),
        "trainer-state": _read_trainer_state, "tensorboard": _read_tensorboard,
        "wandb-csv": lambda p: _read_csv(p, step_key), "csv": lambda p: _read_csv(p, step_key),
        "jsonl": lambda p: _read_jsonl(p, step_key), "notebook": lambda p: _read_notebook(p, logging_steps),
        "console": lambda p: _console_rows(_read_lines(p)),
    }
    rows = readers[kind](path)
    if not rows:
        raise BAIError(f"{path}: no training steps found; expected {EXPECTED}")
    return kind, rows


def _read_text(path: Path, limit: int = -1) -> str:
    if path.is_dir():
        raise BAIError(f"{path}: is a directory; only a TensorBoard run can be a directory")
    try:
        with path.open("rb") as f:
            data = f.read(limit)
    except OSError as e:
        raise BAIError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data.strip():
        raise BAIError(f"{path}: file is empty; expected {EXPECTED}")
    # A binary file is full of NUL bytes; a text log may hold a stray one (NCCL ends a line with \x00 on some hosts).
    if data[:65536].count(b"\x00") * 100 > len(data[:65536]):
        raise BAIError(f"{path}: binary file; expected {EXPECTED}")
    return data.replace(b"\x00", b"").decode("utf-8-sig", errors="replace")


def _read_lines(path: Path) -> str:
    """The text of a line-based log up to its last newline. A log being written may end in half a line (a logger
    writes a line in pieces); that line is left for the next read, which will find it whole."""
    text = _read_text(path)
    return text[: text.rfind("\n") + 1]


class Rows(list):
    """(step, metrics) rows in step order, and how often the log went back to an earlier step (`restarts`)."""
    restarts = 0


def _append(rows: Rows, step: int, metrics: dict) -> None:
    """Add one step. The same step again (wandb writes one step in several rows) adds to it. An earlier step
    means the run was resumed from an earlier checkpoint (or the file holds several runs): the new attempt replaces
    the old one from that step on, as TensorBoard does on a restart, and is counted in rows.restarts."""
    restarted = False
    while rows and rows[-1][0] > step:
        rows.pop()
        restarted = True
    rows.restarts += restarted
    if rows and rows[-1][0] == step:
        old_step, old_metrics = rows.pop()
        metrics = metrics if restarted else {**old_metrics, **metrics}
    rows.append((step, metrics))


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _read_stdout(path: Path) -> list:
    rows = Rows()
    # Split on newlines only: tqdm's \r redraws share a line with the logger's output, and line numbers stay
    # the ones an editor shows.
    for lineno, line in enumerate(_read_lines(path).split("\n"), 1):
        match = STEP_LINE.search(ANSI_ESCAPE.sub("", line))
        if not match:
            continue
        body = match.group(2).rstrip()
        if not body.endswith("}"):
            raise BAIError(
                f"{path}:{lineno}: step line is cut off (truncated file?); expected '✨ Global step N: {{...}}'"
            )
        _append(rows, int(match.group(1)), {key: float(value) for key, value in DICT_ITEM.findall(body)})
    if not rows:
        raise BAIError(f"{path}: no '✨ Global step N: {{...}}' lines; expected {EXPECTED}")
    return rows


def _read_jsonl(path: Path, step_key: str | None = None) -> list:
    rows = Rows()
    keys = (step_key,) if step_key else STEP_KEYS
    for lineno, line in enumerate(_read_lines(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise BAIError(
                f"{path}:{lineno}: not a JSON object (truncated file?); expected one {{\"step\": N, ...}} per line"
            ) from None
        key = next((k for k in keys if isinstance(record, dict) and k in record), None)
        value = record[key] if key else None
        step = _number(value.split("/")[0] if isinstance(value, str) else value)  # ms-swift's "12/500"
        if step is None:
            wanted = " or ".join(f'"{k}"' for k in keys)
            raise BAIError(f"{path}:{lineno}: no {wanted} in this line; expected one {{\"step\": N, ...}} per line "
                           "(name yours with --step-key)")
        if not math.isfinite(step):
            continue  # a NaN or infinite step, as in every reader: no step to put it at
        values = record["data"] if isinstance(record.get("data"), dict) else record  # verl: {"step": N, "data": {...}}
        metrics = {_strip(name): _number(value) for name, value in values.items() if name not in keys}
        _append(rows, int(step), {name: value for name, value in metrics.items() if value is not None})
    return rows


def _read_csv(path: Path, step_key: str | None = None) -> list:
    text = _read_lines(path)
    # A cell may be as long as the file (wandb exports tables and samples as JSON text in a cell); csv's default
    # limit is 128 KiB. The limit is process-wide, so it is put back afterwards.
    limit = csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    try:
        return _read_csv_rows(path, csv.reader(io.StringIO(text, newline="")), step_key)
    except csv.Error as e:
        raise BAIError(f"{path}: not a readable CSV file ({e})") from None
    finally:
        csv.field_size_limit(limit)


def _read_csv_rows(path: Path, table, step_key: str | None) -> list:
    header = [column.strip() for column in next(table, [])]
    keys = (step_key,) if step_key else STEP_KEYS
    step_column = next((c for c in keys if c in header), None)
    if step_column is None:
        raise BAIError(f"{path}: no step column (looked for {', '.join(keys)}); name it with --step-key")
    step_index = header.index(step_column)
    # Panel exports name a column "<run name> - train/rollout/reward_mean"; its __MIN/__MAX twins are ranges.
    names = {
        i: _strip(column.rsplit(" - ", 1)[-1])
        for i, column in enumerate(header)
        if i != step_index and column not in STEP_KEYS and not column.endswith(("__MIN", "__MAX"))
    }
    rows = Rows()
    for cells in table:
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            raise BAIError(
                f"{path}:{table.line_num}: {len(cells)} cells where the header has {len(header)} (truncated file?)"
            )
        step = _number(cells[step_index]) if cells[step_index].strip() else None
        if step is None or not math.isfinite(step):
            continue  # wandb logs tables and samples in rows of their own, without the step
        metrics = {name: _number(cells[i]) for i, name in names.items() if cells[i].strip()}
        _append(rows, int(step), {name: value for name, value in metrics.items() if value is not None})
    return rows


def _read_verl(path: Path) -> list:
    rows = Rows()
    for line in _read_lines(path).split("\n"):
        match = VERL_LINE.search(ANSI_ESCAPE.sub("", line).rstrip())
        if match:
            metrics = {key.strip(): float(value) for key, value in VERL_ITEM.findall(match.group(2))}
            _append(rows, int(match.group(1)), metrics)
    return rows


def _trl_log(segment: str) -> dict | None:
    """The metrics of the Trainer's log dict at the end of `segment`, or None. The Trainer also prints evaluation dicts
    (eval_*) and a closing summary (train_runtime, ...), and other dicts share the console (Unsloth's "vLLM
    Bitsandbytes config using kwargs = {...}"), which would shift every step: a training log holds its loss or its
    epoch (Trainer.log adds the epoch to each)."""
    match = TRL_LINE.search(segment.rstrip())
    metrics = {_strip(key): float(value) for key, value in DICT_ITEM.findall(match.group(1))} if match else {}
    training = ("loss" in metrics or "epoch" in metrics) and not any(
        key.startswith(("eval_", "train_runtime")) for key in metrics)
    return metrics if training else None


def _read_trl(path: Path, logging_steps: int) -> list:
    return _trl_rows(_read_lines(path), logging_steps)


def _trl_rows(text: str, logging_steps: int) -> Rows:
    """The Trainer's log dicts in console text, the n-th at step n x logging_steps."""
    rows = Rows()
    # tqdm redraws its bar with \r on the line the dict was written to, after it as well as before it
    for segment in re.split(r"[\r\n]", ANSI_ESCAPE.sub("", text)):
        metrics = _trl_log(segment)
        if metrics:
            rows.append(((len(rows) + 1) * logging_steps, metrics))
    return rows


def _console_step(segment: str) -> tuple[str, int, dict] | None:
    """(form, step, metrics) of one printed line, or None: a line with a step (CONSOLE_STEP) and two or more
    name=value / name: value pairs besides it (so "Step 3: generating 2 candidates..." is no step). Its form is the
    line up to the step's number without digits and spaces (a timestamp, "%3d" padding): one print statement."""
    match = CONSOLE_STEP.search(segment)
    if not match or DEEPSPEED_TIMER.search(segment):
        return None
    metrics = _console_pairs(segment[: match.start()] + " | " + segment[match.end():])
    form = re.sub(r"[\d\s]", "", segment[: match.start(1)])
    return (form, int(match.group(1)), metrics) if len(metrics) >= 2 else None


def _console_pairs(text: str) -> dict:
    return {_strip(name): float(value.replace(",", "")) for name, value in CONSOLE_ITEM.findall(text)}


def _console_rows(text: str) -> Rows:
    lines = re.split(r"[\r\n]", ANSI_ESCAPE.sub("", text))
    parsed = [_console_step(line) for line in lines]
    forms: dict[str, list] = {}
    for i, line in enumerate(parsed):
        if line:
            forms.setdefault(line[0], []).append((i, *line[1:]))
    # The loop's own print is its most frequent form of line. Another form is part of it where it was printed at its
    # steps with other metrics ("Step: 11 | Loss: ..." and "[step 11] avg_loss=... acc=..."); not where it names the
    # same metrics (per-question records of another log pasted after the steps).
    main = max(forms.values(), key=len, default=[])
    if not main:
        return Rows()
    at = {step: i for i, (_, step, _) in enumerate(main)}  # a step's last line (a resumed run prints some twice)
    merged = [dict(metrics) for _, _, metrics in main]
    names = set().union(*merged)
    for other in forms.values():
        if other is not main and all(step in at for _, step, _ in other) and not names & {
                name for _, _, metrics in other for name in metrics}:
            for _, step, metrics in other:
                merged[at[step]].update(metrics)
    # A line of pairs alone, printed with each step (DeepSpeed-Chat's "average reward score: -0.68" after its
    # "epoch: 0|step: 0|act_loss: ..."), is part of that step: of the step line before it, or after it where the form
    # is printed before the first step line and not after the last (a loop that prints it first); where it is printed
    # on both ends (an evaluation before training, or a growing log cut before its step line), the nearer step line of
    # most. Only forms printed at half the steps or more (not an evaluation every 10 steps), naming other metrics; a
    # line with more than pairs (a sample's "Total: 124 km", a dict) is none.
    seen: dict[tuple, list] = {}
    k = 0  # step lines so far
    for i, line in enumerate(lines):
        if k < len(main) and main[k][0] == i:
            k += 1
        elif (not parsed[i] and line.rstrip(" |,;")[-1:].isdigit()  # a quick no for prose and most lines
              and (pairs := _console_pairs(line)) and not CONSOLE_ITEM.sub("", line).strip(" |,;")):
            seen.setdefault(tuple(pairs), []).append((k, i, pairs))
    for form, printed in seen.items():
        first, last = printed[0][0] == 0, printed[-1][0] == len(main)  # printed before the first / after the last step
        after = last or not first  # of the step line before it
        if first and last:
            between = [(i - main[k - 1][0], main[k][0] - i) for k, i, _ in printed if 0 < k < len(main)]
            after = 2 * sum(behind < ahead for behind, ahead in between) >= len(between)
        at_step = {}
        for k, _, pairs in printed:
            if (k - after) not in at_step and 0 <= k - after < len(main):
                at_step[k - after] = pairs
        if 2 * len(at_step) >= len(main) and not names & set(form):
            names |= set(form)
            for k, metrics in at_step.items():
                merged[k].update(metrics)
    rows = Rows()
    for (_, step, _), metrics in zip(main, merged):
        _append(rows, step, metrics)
    return rows


def _value_count(rows: list) -> int:
    return sum(len(metrics) for _, metrics in rows)


def _read_notebook(path: Path, logging_steps: int) -> list:
    text = _read_text(path)
    outputs: list = [{"data": {"text/html": text}}]  # an HTML page, or a table pasted into Markdown
    if text.lstrip().startswith("{"):
        try:
            cells = json.loads(text).get("cells")
        except (json.JSONDecodeError, AttributeError):
            raise BAIError(f"{path}: not a Jupyter notebook (cut off?); expected a JSON object with cells") from None
        outputs = [output for cell in cells if isinstance(cell, dict) for output in cell.get("outputs") or []
                   if isinstance(output, dict)] if isinstance(cells, list) else []
    table_rows, printed = Rows(), ""  # the text streams: their Trainer dicts, for a notebook without a table
    for output in outputs:
        html = _joined((output.get("data") or {}).get("text/html"))
        for table in html.split("<table")[1:]:  # up to its end, or the end of a table cut off
            lines = [[htmllib.unescape(re.sub(r"<[^>]*>", "", c)).strip() for c in NOTEBOOK_CELL.findall(tr)]
                     for tr in NOTEBOOK_ROW.findall(table.split("</table>")[0])]
            if not lines or lines[0][:1] != ["Step"]:
                continue  # not a training table (an evaluation table by epoch, a dataframe)
            # The headers are the logged names, "/" spaced out ("completions / mean_length"), and the loss.
            names = [{"Training Loss": "loss"}.get(n, n.replace(" / ", "/")) for n in lines[0]]
            for values in lines[1:]:
                step = _number(values[0]) if values else None
                if step is not None and math.isfinite(step):
                    metrics = {name: _number(value) for name, value in zip(names[1:], values[1:])}
                    _append(table_rows, int(step), {k: v for k, v in metrics.items() if v is not None})
        printed += _joined(output.get("text")) + "\n"
    # The Trainer's table, unless it shows the loss alone (plain transformers) while the notebook printed the metrics
    # (a callback's "[Step N] name=value" lines, the Trainer's dicts): then the source holding the most values.
    shown = {name for _, metrics in table_rows for name in metrics}
    rows = table_rows if shown - {"loss"} else max(
        (table_rows, _trl_rows(printed, logging_steps), _console_rows(printed)), key=_value_count)
    if not rows:
        raise BAIError(f"{path}: no Trainer progress table (Step, Training Loss, ...), printed Trainer dicts or "
                       "'[Step N] name=value' lines in it (a notebook saved without its outputs?)")
    return rows


def _joined(text) -> str:
    """A notebook's multi-line string: a list of lines or one string."""
    return "".join(text) if isinstance(text, list) else text if isinstance(text, str) else ""


def _read_trainer_state(path: Path) -> list:
    try:
        state = json.loads(_read_text(path))
        history = state if isinstance(state, list) else state.get("log_history")
    except (json.JSONDecodeError, AttributeError):
        raise BAIError(f"{path}: not a trainer_state.json (cut off?); expected a JSON object with log_history, or "
                       "that list alone") from None
    if not isinstance(history, list):
        raise BAIError(f"{path}: no log_history list; expected a Hugging Face Trainer's trainer_state.json")
    rows = Rows()
    for entry in history:
        step = _number(entry.get("step")) if isinstance(entry, dict) else None
        if step is None or not math.isfinite(step) or any(key.startswith(("eval_", "train_runtime")) for key in entry):
            continue
        metrics = {_strip(key): _number(value) for key, value in entry.items() if key != "step"}
        _append(rows, int(step), {key: value for key, value in metrics.items() if value is not None})
    return rows


def _strip(name: str) -> str:
    """A logger's own prefix: OpenRLHF's TensorBoard/wandb loggers and HF's wandb integration write train/<name>."""
    return name.removeprefix("train/")


def _read_tensorboard(path: Path) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if path.is_dir():
        run_dirs = sorted({event_file.parent for event_file in path.rglob(EVENT_FILE_GLOB)})
        if not run_dirs:
            raise BAIError(f"{path}: no TensorBoard event files ({EVENT_FILE_GLOB}) in this directory")
        if len(run_dirs) > 1:
            listed = ", ".join(str(d) for d in run_dirs)
            raise BAIError(f"{path}: holds several TensorBoard runs ({listed}); pass each one as its own RUN")
        path = run_dirs[0]
    # size_guidance 0 keeps every step; by default TensorBoard samples 1000 of them.
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    try:
        events.Reload()
    except Exception as e:  # the event reader raises its own (TensorFlow-stub) errors on a damaged file
        raise BAIError(f"{path}: cannot read TensorBoard events ({e}); expected {EXPECTED}") from None
    # OpenRLHF's logger writes train/* (and eval/*); verl's writes its metric names as they are.
    tags = events.Tags()["scalars"]
    train_tags = [tag for tag in tags if tag.startswith("train/")] or [tag for tag in tags if "/" in tag]
    if not train_tags:
        raise BAIError(f"{path}: no training scalars (empty or cut-off event file?); expected {EXPECTED}")
    by_step: dict[int, dict[str, float]] = {}
    for tag in train_tags:
        for event in events.Scalars(tag):
            by_step.setdefault(event.step, {})[_strip(tag)] = event.value
    return sorted(by_step.items())
