"""``mpc-dist why RUN_DIR``: the flight records of a run's last failure, as a table.

Every rank that went down wrote ``failure/rank_<r>.json`` (its state, the message it waited
for, its last actions); the rank that reported the failure first also wrote ``summary.json``
with every rank's last published state, which covers a rank that was killed before it could
write. A restarted run keeps an earlier attempt's records as ``failure.<n>/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .attempts import FAILURE, archived_failures

RECENT_SHOWN = 6  # actions per rank in the table (the file holds up to 32)


def failure_records(run_dir: Path) -> tuple[Path, dict[str, Any] | None, list[dict[str, Any]]]:
    """The folder of the latest failure's records, its summary (or None) and the rank records
    (by rank). Raises FileNotFoundError when the run has none."""
    run_dir = Path(run_dir)
    if any(run_dir.glob("rank_*.json")) or (run_dir / "summary.json").exists():
        return _read_folder(run_dir)  # a failure folder itself, e.g. an attempt's failure.1
    folders = [run_dir / FAILURE] if (run_dir / FAILURE).is_dir() else []
    folders = folders or archived_failures(run_dir)[-1:]
    if not folders:
        raise FileNotFoundError(f"{run_dir} holds no flight records ({FAILURE}/): nothing failed")
    return _read_folder(folders[0])


def _read_folder(folder: Path) -> tuple[Path, dict[str, Any] | None, list[dict[str, Any]]]:
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    records = [json.loads(p.read_text()) for p in folder.glob("rank_*.json")]
    return folder, summary, sorted(records, key=lambda r: r["rank"])


def why_table(summary: dict[str, Any] | None, records: list[dict[str, Any]]) -> Table:
    """One row per rank: its state (the message it waited for), its last actions, its exit."""
    table = Table(show_lines=True)
    for column in ("rank", "stage", "state when it stopped", "last actions", "how it ended"):
        table.add_column(column, overflow="fold")
    seen = set()
    for record in records:
        seen.add(record["rank"])
        recent = " ".join(a["action"] for a in record["recent"][-RECENT_SHOWN:])
        ended = record["reason"]
        if record.get("error"):
            ended += "\n" + record["error"].strip().splitlines()[-1]
        where = f"{record['stage']}" + (
            f" (replica {record['replica']})" if record["replica"] else ""
        )
        cells = (str(record["rank"]), where, record["state"], recent, ended[:600])
        table.add_row(*map(Text, cells))  # Text: a path or gloo's "[file:line]" is no markup
    for rank, state in sorted((summary or {}).get("states", {}).items(), key=lambda x: int(x[0])):
        if int(rank) not in seen:
            ended = "no record: killed or could not write"
            cells = (rank, "", f"{state} (last published)", "", ended)
            table.add_row(*map(Text, cells))
    return table


def explain(run_dir: Path, console: Console | None = None) -> None:
    """Print the last failure of ``run_dir``: its one line, then the table."""
    console = console or Console()
    folder, summary, records = failure_records(run_dir)
    failure = (summary or {}).get("failure") or next(
        (r["failure"] for r in records if r.get("failure")), None
    )
    when = max([r["time"] for r in records] + [(summary or {}).get("time", 0)])
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    console.print(Text(str(folder), style="bold"), f"({stamp})", markup=False)
    if failure:
        console.print(f"failure: {failure}", markup=False, highlight=False)
    console.print(why_table(summary, records))
