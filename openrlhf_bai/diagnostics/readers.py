"""Read a finished (or running) training run into (step, metrics) rows for the detectors.

Pure I/O: which kind of file a RUN is, and its per-step metrics. Names are normalised to the ones
`PPOTrainer.fit` puts in its status dict (`rollout/response_length_mean`, or `response_length` in 0.9/0.10),
so the detectors' LENGTH_KEYS / REWARD_KEYS fit every kind.

Kinds:
- stdout: the driver's output, with the line `PPOTrainer.fit` logs each step through
  `openrlhf.utils.logging_utils` (behind Ray's `(PPOTrainer pid=...)` prefix):
  `INFO 05-01 12:00:00 ppo_trainer.py:551] ✨ Global step 12: {'rollout/reward_mean': 0.41, ...}`
- tensorboard: a directory written by OpenRLHF's TensorboardLogger (`train/<name>` scalars), or one event file.
- wandb-csv: a CSV export from wandb: the run's history (`_step`, `train/global_step`, `train/...` columns)
  or a panel export (`Step`, `<run> - train/...`, `<run> - train/...__MIN`/`__MAX`).
- jsonl: the plugin's own log, one `{"step": N, "<metric>": value, ...}` object per line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

from openrlhf_bai.errors import BAIError

KINDS = ("stdout", "tensorboard", "wandb-csv", "jsonl")
EXPECTED = (
    "an OpenRLHF stdout log with '✨ Global step N: {...}' lines, a TensorBoard event directory, "
    "a wandb CSV export or the plugin's JSONL"
)

STEP_LINE = re.compile(r"Global step (\d+): (\{.*)$")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# 'key': value inside the logged dict. A value may be wrapped (np.float64(0.5), tensor(0.5)); nan/inf are
# how Python prints non-finite floats. Non-numeric values (strings, lists) are skipped.
DICT_ITEM = re.compile(
    r"'([^'\\]+)':\s*(?:[A-Za-z_][\w.]*\()?"
    r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf))(?![\w.])"
)
CSV_STEP_COLUMNS = ("train/global_step", "Step", "_step")  # most exact first
EVENT_FILE_GLOB = "events.out.tfevents.*"


def detect_kind(path: Path) -> str:
    if path.is_dir() or EVENT_FILE_GLOB.rstrip("*") in path.name:
        return "tensorboard"
    head = _read_text(path, limit=65536)
    first_line = next((line for line in head.splitlines() if line.strip()), "")
    if first_line.lstrip().startswith("{"):
        return "jsonl"
    if any(column.strip() in CSV_STEP_COLUMNS for column in next(csv.reader([first_line]), [])):
        return "wandb-csv"
    return "stdout"  # the stdout reader says so if no step line turns up anywhere in the file


def read_rows(path: str | Path, kind: str | None = None) -> tuple[str, list[tuple[int, dict[str, float]]]]:
    """(kind, rows) of one RUN, rows in step order; `kind` forces the format instead of detecting it."""
    path = Path(path)
    if not path.exists():
        raise BAIError(f"{path}: no such file or directory; expected {EXPECTED}")
    kind = kind or detect_kind(path)
    reader = {"stdout": _read_stdout, "tensorboard": _read_tensorboard, "wandb-csv": _read_csv, "jsonl": _read_jsonl}
    if kind not in reader:
        raise BAIError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    rows = reader[kind](path)
    if not rows:
        raise BAIError(f"{path}: no training steps found; expected {EXPECTED}")
    return kind, rows


def _read_text(path: Path, limit: int = -1) -> str:
    if path.is_dir():
        raise BAIError(f"{path}: is a directory; only a TensorBoard run can be a directory")
    with path.open("rb") as f:
        data = f.read(limit)
    if not data.strip():
        raise BAIError(f"{path}: file is empty; expected {EXPECTED}")
    if b"\x00" in data[:65536]:
        raise BAIError(f"{path}: binary file; expected {EXPECTED}")
    return data.decode("utf-8-sig", errors="replace")


def _append(rows: list, step: int, metrics: dict) -> None:
    """Add one step. The same step again (wandb writes one step in several rows) adds to it. An earlier step
    means the run was resumed from an earlier checkpoint: the new attempt replaces the old one from that step on,
    as TensorBoard does on a restart."""
    restarted = False
    while rows and rows[-1][0] > step:
        rows.pop()
        restarted = True
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
    rows: list = []
    # Split on newlines only: tqdm's \r redraws share a line with the logger's output, and line numbers stay
    # the ones an editor shows.
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
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


def _read_jsonl(path: Path) -> list:
    rows: list = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise BAIError(
                f"{path}:{lineno}: not a JSON object (truncated file?); expected one {{\"step\": N, ...}} per line"
            ) from None
        step = _number(record.get("step")) if isinstance(record, dict) else None
        if step is None:
            raise BAIError(f"{path}:{lineno}: no \"step\" in this line; expected one {{\"step\": N, ...}} per line")
        metrics = {key: _number(value) for key, value in record.items() if key != "step"}
        _append(rows, int(step), {key: value for key, value in metrics.items() if value is not None})
    return rows


def _read_csv(path: Path) -> list:
    table = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = [column.strip() for column in next(table)]
    step_column = next((c for c in CSV_STEP_COLUMNS if c in header), None)
    if step_column is None:
        columns = ", ".join(CSV_STEP_COLUMNS)
        raise BAIError(f"{path}: no step column; expected a wandb CSV export with one of {columns}")
    step_index = header.index(step_column)
    # Panel exports name a column "<run name> - train/rollout/reward_mean"; its __MIN/__MAX twins are ranges.
    names = {
        i: column.rsplit(" - ", 1)[-1].removeprefix("train/")
        for i, column in enumerate(header)
        if column not in CSV_STEP_COLUMNS and not column.endswith(("__MIN", "__MAX"))
    }
    rows: list = []
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
    train_tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("train/")]
    if not train_tags:
        raise BAIError(
            f"{path}: no train/* scalars (empty or cut-off event file?); expected OpenRLHF's TensorboardLogger output"
        )
    by_step: dict[int, dict[str, float]] = {}
    for tag in train_tags:
        for event in events.Scalars(tag):
            by_step.setdefault(event.step, {})[tag.removeprefix("train/")] = event.value
    return sorted(by_step.items())
