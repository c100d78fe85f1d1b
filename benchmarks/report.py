"""The results: one CSV row per (case, setting), rewritten atomically after every run, and a
markdown table of ratios against the reference setting (absolute times drift on shared machines;
ratios measured in the same run, on the same machine, drift much less)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

CSV_NAME = "results.csv"
MARKDOWN_NAME = "results.md"
MACHINE_NAME = "machine.json"


@dataclass(frozen=True)
class Row:
    case: str
    kind: str  # synthetic, labelled, or pair (label overlap between two labelled cases)
    setting: str
    status: str  # ok, failed, timeout, skipped
    reason: str = ""
    grid_mm: float | None = None
    wall_s: float | None = None
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    landmark_mean_mm: float | None = None
    landmark_p95_mm: float | None = None
    landmark_max_mm: float | None = None
    dice_subcortical: float | None = None
    dice_cortical: float | None = None
    dice_white_matter: float | None = None
    dice_brain_mask: float | None = None
    folding_share: float | None = None
    jacobian_min: float | None = None
    threads: int | None = None
    seed: int | None = None
    load1_start: float | None = None
    load1_end: float | None = None
    started: str = ""  # ISO time, UTC
    returncode: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.case, self.setting)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


COLUMNS = [f.name for f in fields(Row)]
_INTEGERS = {"threads", "seed", "returncode"}
_TEXT = {"case", "kind", "setting", "status", "reason", "started"}


def _parse(name: str, text: str):
    if name in _TEXT:
        return text
    if text == "":
        return None
    return int(text) if name in _INTEGERS else float(text)


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def read_rows(out_dir: Path) -> dict[tuple[str, str], Row]:
    path = out_dir / CSV_NAME
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        rows = [Row(**{k: _parse(k, v) for k, v in r.items() if k in COLUMNS})
                for r in csv.DictReader(handle)]  # fmt: skip
    return {row.key: row for row in rows}


def write_rows(out_dir: Path, rows: dict[tuple[str, str], Row]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows.values():
        writer.writerow({k: _format(v) for k, v in asdict(row).items()})
    return write_atomically(out_dir / CSV_NAME, buffer.getvalue())


def write_atomically(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(tmp, path)
    return path


# ---- machine facts ------------------------------------------------------------------------------


def machine_facts() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("mninorm", "antspyx", "picsl_greedy", "numpy", "scipy", "nibabel", "psutil"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        "mninorm_commit": _git(["rev-parse", "--short", "HEAD"]),
        "mninorm_tree_modified": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
        # tells apart runs of one commit with different uncommitted edits of the pipeline
        "mninorm_diff_sha1": hashlib.sha1(
            _git(["diff", "HEAD", "--", "bids_app"]).encode()
        ).hexdigest()[:12],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(args: list[str]) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        return done.stdout.strip() if done.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def record_invocation(out_dir: Path, argv: list[str], started: float, ended: float | None) -> None:
    """machine.json: the facts of this machine, and one entry per invocation (load averages)."""
    path = out_dir / MACHINE_NAME
    data = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
    facts = machine_facts()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    entries = [e for e in data["invocations"] if e.get("started") != stamp]
    entry = next((e for e in data["invocations"] if e.get("started") == stamp), {})
    if not entry:
        entry.update(load_start=os.getloadavg(), mninorm_commit=facts["mninorm_commit"],
                     mninorm_diff_sha1=facts["mninorm_diff_sha1"])  # fmt: skip
    entry.update(started=stamp, argv=argv)
    if ended is not None:
        entry.update(seconds=round(ended - started, 1), load_end=os.getloadavg())
    data = {**data, **facts, "invocations": [*entries, entry]}
    write_atomically(path, json.dumps(data, indent=1))


# ---- markdown -----------------------------------------------------------------------------------


def ratio(value, reference) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value / reference


def geometric_mean(values) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _cell(value, digits=2, percent=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if percent:
        return f"{100 * value:.3g}"
    return f"{value:.{digits}f}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(line) + " |" for line in lines),
    ]


def render_markdown(rows: dict, reference: str, descriptions: dict[str, str], machine: dict) -> str:
    by_case: dict[str, dict[str, Row]] = {}
    for row in rows.values():
        by_case.setdefault(row.case, {})[row.setting] = row
    settings = list(dict.fromkeys(r.setting for r in rows.values()))
    settings.sort(key=lambda s: s != reference)

    def ref(row: Row) -> Row | None:
        found = by_case[row.case].get(reference)
        return found if found is not None and found.ok else None

    out = ["# mninorm registration benchmark", ""]
    versions = machine.get("versions", {})
    out += [
        f"Machine: {machine.get('cpus_usable', '?')} usable CPUs ({machine.get('cpu_model', '?')}),"
        f" {machine.get('memory_gb', '?')} GB; mninorm {versions.get('mninorm', '?')} "
        f"(commit {machine.get('mninorm_commit') or '?'}"
        f"{', modified tree' if machine.get('mninorm_tree_modified') else ''}), antspyx "
        f"{versions.get('antspyx', '?')}, picsl_greedy {versions.get('picsl_greedy', '?')}.",
        "",
        f"Ratios (x ref) divide a setting's figure by the reference's (`{reference}`: "
        f"{descriptions.get(reference, '')}) on the same case. Times are of the whole child "
        "process (wall, CPU user+system with children, peak RSS of the process tree). "
        "Folding: share of non-positive Jacobian determinants of the whole forward transform "
        "inside the fixed brain mask, in %.",
        "",
        "## Summary per setting",
        "",
        "Geometric means of the per-case ratios over the cases where the setting and the "
        "reference both ran; landmark errors are means over the synthetic cases.",
        "",
    ]
    summary = []
    for name in settings:
        mine = [r for r in rows.values() if r.setting == name and r.kind != "pair"]
        done = [r for r in rows.values() if r.setting == name and r.ok]
        scored = [(r, ref(r)) for r in done if ref(r) is not None and r.kind != "pair"]
        synthetic = [r for r in done if r.kind == "synthetic"]
        pairs = [r for r in done if r.kind == "pair"]
        summary.append([
            f"`{name}`", descriptions.get(name, ""),
            f"{len([r for r in mine if r.ok])}/{len(mine)}",
            _cell(geometric_mean(ratio(r.wall_s, b.wall_s) for r, b in scored)),
            _cell(geometric_mean(ratio(r.cpu_s, b.cpu_s) for r, b in scored)),
            _cell(geometric_mean(ratio(r.peak_rss_mb, b.peak_rss_mb) for r, b in scored)),
            _cell(_mean(r.landmark_mean_mm for r in synthetic)),
            _cell(_mean(r.landmark_p95_mm for r in synthetic)),
            _cell(geometric_mean(ratio(r.landmark_mean_mm, b.landmark_mean_mm)
                                 for r, b in scored if r.kind == "synthetic")),
            _cell(_mean(r.dice_subcortical for r in pairs), 3),
            _cell(_mean(r.dice_cortical for r in pairs), 3),
            _cell(max((r.folding_share for r in done if r.folding_share is not None),
                      default=None), percent=True),
        ])  # fmt: skip
    out += _table(
        ["setting", "what", "ran ok", "wall x ref", "CPU x ref", "memory x ref",
         "landmark mean mm", "landmark p95 mm", "error x ref", "Dice subcortical",
         "Dice cortical", "folding max %"], summary,
    )  # fmt: skip

    synthetic = [r for r in rows.values() if r.kind == "synthetic"]
    if synthetic:
        out += ["", "## Synthetic cases: landmark error against the known transform (mm)", ""]
        lines = []
        for row in _ordered(synthetic, reference):
            base = ref(row)
            lines.append([
                row.case, f"`{row.setting}`", _status(row), _cell(row.wall_s, 0),
                _cell(ratio(row.wall_s, base and base.wall_s)), _cell(row.cpu_s, 0),
                _cell(row.peak_rss_mb, 0), _cell(row.landmark_mean_mm),
                _cell(row.landmark_p95_mm), _cell(row.landmark_max_mm),
                _cell(ratio(row.landmark_mean_mm, base and base.landmark_mean_mm)),
                _cell(row.folding_share, percent=True), _cell(row.jacobian_min),
            ])  # fmt: skip
        out += _table(
            ["case", "setting", "status", "wall s", "wall x ref", "CPU s", "peak MB", "mean",
             "p95", "max", "error x ref", "folding %", "min det"], lines,
        )  # fmt: skip

    labelled = [r for r in rows.values() if r.kind in ("labelled", "pair")]
    if labelled:
        out += ["", "## Labelled cases: overlap in template space", "",
                "Participants: Dice of the warped brain mask with the template's. Pairs: Dice "
                "per structure between the two participants' warped labels (subcortical: mean "
                "over 25 aseg structures; cortical: all cortex labels merged per hemisphere; "
                "white matter: cerebral, per hemisphere); times of a pair are the sum of its "
                "two runs.", ""]  # fmt: skip
        lines = []
        for row in _ordered(labelled, reference):
            base = ref(row)
            lines.append([
                row.case, f"`{row.setting}`", _status(row), _cell(row.wall_s, 0),
                _cell(ratio(row.wall_s, base and base.wall_s)), _cell(row.peak_rss_mb, 0),
                _cell(row.dice_brain_mask, 3), _cell(row.dice_subcortical, 3),
                _cell(ratio(row.dice_subcortical, base and base.dice_subcortical)),
                _cell(row.dice_cortical, 3), _cell(row.dice_white_matter, 3),
                _cell(row.folding_share, percent=True),
            ])  # fmt: skip
        out += _table(
            ["case", "setting", "status", "wall s", "wall x ref", "peak MB", "Dice brain",
             "Dice subcortical", "subcortical x ref", "Dice cortical", "Dice WM", "folding %"],
            lines,
        )  # fmt: skip
    return "\n".join(out) + "\n"


def _ordered(rows: list[Row], reference: str) -> list[Row]:
    cases = list(dict.fromkeys(r.case for r in rows))
    return sorted(rows, key=lambda r: (cases.index(r.case), r.setting != reference))


def _status(row: Row) -> str:
    return row.status if row.ok or not row.reason else f"{row.status}: {row.reason[:60]}"


def write_markdown(out_dir: Path, rows: dict, reference: str, descriptions: dict) -> Path:
    machine_path = out_dir / MACHINE_NAME
    machine = json.loads(machine_path.read_text()) if machine_path.is_file() else {}
    text = render_markdown(rows, reference, descriptions, machine)
    return write_atomically(out_dir / MARKDOWN_NAME, text)
