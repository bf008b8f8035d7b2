"""Writes benchmarks/README.md: how to run each benchmark script, and one row per file in benchmarks/results/
(what it measures, the script and command that wrote it, the machine, the date it was first committed).

    python benchmarks/index.py           # (re)write benchmarks/README.md
    python benchmarks/index.py --check   # exit 1, naming the missing and stale rows, if README.md is out of date

Standard library only (no torch). Everything comes from the results files and the git history, nothing is
guessed: a command is the one a file records, else one rebuilt from the options it records (saying which it
does not), else a `python benchmarks/SCRIPT.py ...` line in the message of a commit that added or changed it;
otherwise "not recorded". The output is sorted and has no timestamp of its own, so --check is deterministic.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
README = BENCH / "README.md"
NOT_RECORDED = "not recorded"

# What each script's files measure, in a few words (the script's docstring says it at length); a key is a
# prefix of the results file's name, the longest one wins. A script missing here gets its docstring's first line.
MEASURES = {
    "accuracy_joint": "top-1: FP vs min-max vs joint pipelines",
    "accuracy_minmax": "top-1: min-max vs torchao PT2E/XNNPACK baselines",
    "backend_latency": "packed backend: latency vs fp32, size, agreement",
    "calib_sources": "top-1 by calibration source (real vs data-free)",
    "coverage": "what runs quantized in each ViT architecture",
    "executorch_pte": "ExecuTorch .pte vs fp32 .pte: latency, size, agreement",
    "executorch_pte-float-sensitivity": "argmax moved by a last-bit change in GELU / LayerNorm / softmax",
    "executorch_pte-table-aten-gelu": "the .pte table before vitqc's own GELU and LayerNorm (ATen's kernels)",
    "float_ops": "vitqc's reproducible GELU and LayerNorm vs ATen's kernels: time in PyTorch",
    "host_overhead_ab": "joint-step host overhead, this tree vs a base revision",
    "joint_ops": "aten kernels and views per joint step, plain vs fused",
    "joint_throughput": "joint-step throughput and memory",
    "joint_tuning": "top-1 of joint_optimize option trials",
    "mixed_precision": "top-1: searched mixed precision vs uniform W4A4",
    "prompt_throughput": "learned-prompts: learning s/class, generation images/s",
}
# fields whose values tell one file of a script from another (looked up at the top, in "args" and in each row):
# label -> the field names that hold it (comma-separated strings are split)
DETAIL_KEYS = {"model": ("model", "models"), "arch": ("arch",), "pipeline": ("pipeline",),
               "scheme": ("scheme", "schemes"), "bits": ("bits",), "granularity": ("granularity",),
               "batch": ("batch", "batches"), "img size": ("img_size",), "width": ("width",),
               "attention": ("attention",), "device": ("device",), "sources": ("sources",)}


@dataclass
class Option:
    flag: str
    kind: str  # "flag" (store_true), "append", "nargs" or "value"
    default: object = None


@dataclass
class Script:
    stem: str
    summary: str  # the docstring's first paragraph
    usage: list[str]
    options: dict[str, Option]  # by argparse dest


@dataclass
class Row:
    file: str
    script: str | None
    script_note: str = ""
    measures: str = ""
    commands: list[str] = field(default_factory=list)
    command_note: str = ""
    machine: str = NOT_RECORDED
    date: str = "not committed"

    def line(self) -> str:
        script = f"benchmarks/{self.script}.py{self.script_note}" if self.script else NOT_RECORDED
        command = "<br>".join(f"`{c}`" for c in self.commands) + self.command_note if self.commands else NOT_RECORDED
        cells = [f"[{self.file}](results/{quote(self.file)})", script, self.measures, command, self.machine, self.date]
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


# -- the scripts --------------------------------------------------------------------------------------------------

def read_script(path: Path) -> Script:
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree) or ""
    options: dict[str, Option] = {}
    for node in ast.walk(tree):
        call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        if not (call and node.func.attr == "add_argument"):
            continue
        flags = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
        if not flags:
            continue
        kw = {k.arg: k.value for k in node.keywords}
        const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
        dest = const.get("dest", flags[0][2:].replace("-", "_"))
        action = const.get("action")
        kind = ("flag" if action == "store_true" else "append" if action == "append" else
                "nargs" if "nargs" in kw else "value")
        options[dest] = Option(flags[0], kind, const.get("default"))
    lines = doc.splitlines()
    summary = " ".join(doc.split("\n\n")[0].split())  # the first paragraph
    return Script(path.stem, summary, usage_lines(lines, "python benchmarks/"), options)


def usage_lines(lines: list[str], start: str) -> list[str]:
    """The command lines of a docstring or header comment: lines starting with ``start`` and their continuations."""
    out: list[str] = []
    indent = None
    for line in lines:
        text = line.strip()
        if text.startswith(start):
            indent = len(line) - len(line.lstrip())
            out.append(text)
        elif indent is not None and text[:1] in ("[", "-"):
            out.append(line[indent:].rstrip())
        else:
            indent = None
    return out


def benchmark_scripts() -> dict[str, Script]:
    """benchmarks/*.py run as programs (a ``__main__`` guard), this index excepted."""
    return {p.stem: read_script(p) for p in sorted(BENCH.glob("*.py"))
            if p.name != "index.py" and "__name__ == \"__main__\"" in p.read_text()}


# -- git ----------------------------------------------------------------------------------------------------------

def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def require_full_history() -> None:
    try:
        shallow = git("rev-parse", "--is-shallow-repository").strip() == "true"
    except (SystemExit, OSError):
        raise SystemExit("error: benchmarks/index.py reads dates and commands from git: run it in a git checkout")
    if shallow:
        raise SystemExit("error: this clone is shallow and benchmarks/index.py needs the whole git history "
                         "(dates, commands): run `git fetch --unshallow` first")


def commits(path: Path) -> list[tuple[str, str, str]]:
    """(sha, author date, message) of the commits that added or changed ``path``, newest first. Renames are followed
    (90 % similar or more); a file git sees as copied from another results file (they look alike) begins there."""
    out = git("log", "--follow", "-M90%", "--format=%x1e%H%x1f%as%x1f%B%x1f", "--name-status", "--",
              str(path.relative_to(ROOT)))
    found = []
    for entry in out.split("\x1e")[1:]:
        sha, date, message, status = entry.split("\x1f", 3)
        found.append((sha, date, message))
        if status.strip()[:1] in ("A", "C"):
            break
    return found


def scripts_named(message: str, stems) -> set[str]:
    return {s for s in stems if re.search(rf"(?<![\w/.-])(?:benchmarks/)?{re.escape(s)}(?:\.py)?(?![\w-])", message)}


def commands_in(message: str, script: str) -> list[str]:
    """Every ``python benchmarks/SCRIPT.py ...`` in a commit message, up to a backtick, ';', ' (' or the line's end."""
    found = []
    for m in re.finditer(rf"python3?\s+(?:\./)?benchmarks/{re.escape(script)}\.py([^\n`;]*)", message):
        rest = re.split(r"\s\(", m.group(1))[0].strip().rstrip(".,:")
        found.append(f"python benchmarks/{script}.py {rest}".strip())
    return found


# -- one results file ---------------------------------------------------------------------------------------------

def stem_output(stem: str, script: str, dest: str) -> str:
    """The value of an output-name option (--tag, --result, --name, --out) that writes results/STEM.json."""
    if dest == "tag":
        return stem[len(script) + 1:] if stem.startswith(script + "-") else ""
    return stem


def render(script: Script, values: dict, stem: str) -> tuple[str, list[str], list[str]]:
    """A command line from option values by argparse dest; (command, the recorded names that are no option of the
    script today, what was taken from the file name)."""
    values = dict(values)
    from_name = []
    for dest in ("tag", "result", "name", "out"):
        if dest in script.options and not values.get(dest):
            wanted = stem_output(stem, script.stem, dest)
            if wanted and wanted != script.options[dest].default:
                values[dest] = wanted
                from_name.append(f"{script.options[dest].flag} {wanted}")
    argv, unknown = [], []
    for dest, value in values.items():
        opt = script.options.get(dest)
        if opt is None:
            unknown.append(dest)
        elif value is None or value is False or value == "" or value == []:
            continue
        elif opt.kind == "flag":
            argv.append(opt.flag)
        elif opt.kind == "append":
            for v in value if isinstance(value, list) else [value]:
                argv += [opt.flag, str(v)]
        elif opt.kind == "nargs":
            argv += [opt.flag, *(str(v) for v in (value if isinstance(value, list) else [value]))]
        else:
            argv += [opt.flag, str(value)]
    return " ".join(["python", f"benchmarks/{script.stem}.py", *map(shlex.quote, argv)]), unknown, from_name


def dicts(value) -> list[dict]:
    """The records of a list of them, or of a dict of them by name."""
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [v for v in values if isinstance(v, dict)]


# Scripts whose results files keep a run's options outside an "args" record: the option values (by dest) of each
# run the file holds, and the options that matter but are not recorded.
def calib_sources_options(rec: dict, stem: str):
    rows = dicts(rec.get("rows"))
    sources = list(dict.fromkeys(s for r in rows if isinstance(r.get("sources"), dict) for s in r["sources"]))
    keys = ("pipeline", "overrides", "limit", "calib_size", "inversion_steps", "threads")
    values = {k: rec[k] for k in keys if k in rec}
    values.update(models=",".join(str(r.get("model")) for r in rows), sources=",".join(sources),
                  inversion_opt=rec.get("inversion_options"), tiny_timing="tiny_pipeline_timing" in rec)
    missing = []
    if "inversion" in sources:
        missing += ["--inversion-batch"] + ([] if "inversion_options" in rec else ["--inversion-opt"])
    if {"prompts", "learned-prompts"} & set(sources):
        missing += ["--prompt-steps", "--diffusion"]
    return [values], missing, []


def host_overhead_options(rec: dict, stem: str):
    keys = ("base", "model", "width", "img_size", "batch", "threads", "steps", "repeats")
    values = {k: rec[k] for k in keys if k in rec}
    values["no_compile"] = isinstance(rec.get("modes"), dict) and "compiled" not in rec["modes"]
    notes = [f"run in a checkout of {rec['tree']}"] if isinstance(rec.get("tree"), str) else []
    return [values], [f"--{k.replace('_', '-')}" for k in keys if k not in rec], notes


def prompt_throughput_options(rec: dict, stem: str):
    return [{k: rec[k] for k in ("arch", "device", "steps") if k in rec}], ["--threads"], []


def joint_throughput_options(rec: dict, stem: str):
    keys = ("model", "img_size", "width", "device", "batch", "bits", "granularity", "activation_checkpointing",
            "steps", "repeats", "compare", "compile", "compile_mode")
    runs = [{k: r[k] for k in keys if k in r} | ({"count_ops": True} if stem == "joint_ops" else {})
            for r in dicts(rec.get("rows"))]
    return runs, [], []


def coverage_options(rec: dict, stem: str):
    rows = rec.get("rows")
    values = {"archs": ",".join(rows) if isinstance(rows, dict) else None,
              "calib": rec.get("calib_images"), "heldout": rec.get("heldout_images")}
    return [values], ["--threads"], []


def executorch_pte_options(rec: dict, stem: str):
    timed = dicts(rec.get("timed"))
    if not timed:
        return [], [], []
    return [{"time": [t.get("pte") for t in timed], "runs": rec.get("runs")}], [], ["the .pte files were temporary"]


SETTINGS = {"calib_sources": calib_sources_options, "coverage": coverage_options,
            "host_overhead_ab": host_overhead_options, "prompt_throughput": prompt_throughput_options,
            "joint_throughput": joint_throughput_options, "executorch_pte": executorch_pte_options}


def command(rec: dict, script: Script | None, stem: str, history) -> tuple[list[str], str]:
    recorded = rec.get("command") or rec.get("argv")
    if isinstance(recorded, str):
        return [recorded], " (recorded)"
    if isinstance(recorded, list) and recorded:
        return [shlex.join(map(str, recorded))], " (recorded)"
    if script is not None:
        if isinstance(rec.get("args"), dict):
            runs, missing, notes, source = [rec["args"]], [], [], "the file's args"
        elif script.stem in SETTINGS:
            runs, missing, notes = SETTINGS[script.stem](rec, stem)
            source = "the options the file records"
        else:
            runs = []
        if runs:
            lines, unknown, from_name = [], set(), []
            for values in runs:
                line, unk, named = render(script, values, stem)
                lines.append(line)
                unknown.update(unk)
                from_name += [n for n in named if n not in from_name]
            notes = [f"rebuilt from {source}"] + [f"{n} from the file name" for n in from_name] + notes
            if missing:
                notes.append("not recorded: " + ", ".join(missing))
            if unknown:
                notes.append("recorded but no option of the script now: " + ", ".join(sorted(unknown)))
            return list(dict.fromkeys(lines)), " (" + "; ".join(notes) + ")"
        tag = stem_output(stem, script.stem, "tag")
        for sha, _, message in history:
            found = list(dict.fromkeys(commands_in(message, script.stem)))
            if len(found) > 1:
                found = [c for c in found if stem in c or (tag and tag in c)]
            if len(found) == 1:
                return found, f" (from commit {sha[:7]})"
    return [], ""


def machine(rec: dict) -> str:
    m = rec.get("machine")
    if isinstance(m, str):
        return m
    if isinstance(m, dict):
        parts = [str(m["cpu"])] if m.get("cpu") else []
        parts += [f"{m[k]} {k}" for k in ("cores", "threads") if m.get(k) is not None]
        parts.append(str(m.get("gpu", "no GPU")))
        return ", ".join(parts)
    per_row = list(dict.fromkeys(r["machine"] for r in dicts(rec.get("rows")) if isinstance(r.get("machine"), str)))
    if per_row:
        return "; ".join(per_row)
    partial = [str(rec[k]) for k in ("device",) if isinstance(rec.get(k), str)]
    partial += [f"{rec[k]} {k}" for k in ("cores", "threads") if isinstance(rec.get(k), int)]
    return ", ".join(partial) + " (CPU model not recorded)" if partial else NOT_RECORDED


def listing(values: list, limit: int = 5) -> str:
    values = list(dict.fromkeys(str(v) for v in values if v is not None and v != ""))
    return ", ".join(values[:limit]) + (f" (+{len(values) - limit})" if len(values) > limit else "")


def cell_details(cells: dict) -> str:
    """The parts of the cells' names (model / scheme / label), then the joint runs' length and changed options."""
    parts = [str(k).split("/") for k in cells]
    columns = [listing([p[i] for p in parts if len(p) > i]) for i in range(max(map(len, parts), default=0))]
    runs, changed = [], []
    for cell in (c for c in cells.values() if isinstance(c, dict)):
        overrides = cell.get("overrides")
        options = ({k.replace("__", "."): v for k, v in overrides.items()} if isinstance(overrides, dict) else
                   dict(str(o).partition("=")[::2] for o in overrides) if isinstance(overrides, list) else {})
        iterations = cell.get("iterations") or options.pop("joint_optimize.iterations", None)
        batch = cell.get("batch_size") or options.pop("joint_optimize.batch_size", None)
        if iterations:
            runs.append(f"{iterations}x{batch}" if batch else f"{iterations} iterations")
        changed += [f"{k}={v}" for k, v in options.items()]
        if cell.get("device") not in (None, "cpu"):
            changed.append(f"on {cell['device']}")
    named = {p for name in parts for p in name}
    columns += [listing([r for r in runs if r not in named]), listing(changed)]
    return "; ".join(c for c in columns if c)


def details(rec: dict) -> str:
    """What tells this file from the script's others: models, schemes, pipeline... or the names of its cells."""
    if isinstance(rec.get("cells"), dict):
        return cell_details(rec["cells"])
    records = [rec] + ([rec["args"]] if isinstance(rec.get("args"), dict) else []) + dicts(rec.get("rows"))
    found = []
    for label, keys in DETAIL_KEYS.items():
        values = []
        for r in records:
            for v in (r.get(k) for k in keys):
                values += (list(v) if isinstance(v, dict) else v.split(",") if isinstance(v, str)
                           else [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else [])
        if label == "device":
            values = [v for v in values if v != "cpu"]
        if values:
            found.append(f"{label} {listing(values)}")
    if isinstance(rec.get("rows"), dict):
        found.append(f"rows {listing(list(rec['rows']))}")
    if dicts(rec.get("timed")):
        found.append(f"{len(rec['timed'])} .pte files re-timed")
    return "; ".join(found)


def measures(rec: dict, stem: str, script: Script | None) -> str:
    if isinstance(rec.get("what"), str):  # the file describes itself
        return re.split(r"[;:]", rec["what"])[0].strip()
    key = max((k for k in MEASURES if stem.startswith(k)), key=len, default=None)
    phrase = MEASURES[key] if key else (re.split(r"(?<=\.)\s", script.summary)[0].rstrip(".") if script else "")
    detail = details(rec)
    return f"{phrase} — {detail}" if phrase and detail else phrase or detail or NOT_RECORDED


def attribute(path: Path, rec: dict, scripts: dict[str, Script], history) -> tuple[str | None, str]:
    """The script that wrote a results file: its own record, its name, a script naming it, or a commit's message."""
    named = rec.get("script")
    if isinstance(named, str) and Path(named).stem in scripts:
        return Path(named).stem, ""
    stem = path.stem
    prefixes = [s for s in scripts if stem == s or re.match(rf"{re.escape(s)}[-_]", stem)]
    if prefixes:
        return max(prefixes, key=len), ""
    naming = [s for s in scripts if f"results/{path.name}" in (BENCH / f"{s}.py").read_text()]
    if len(naming) == 1:
        return naming[0], ""
    for sha, _, message in history:
        found = scripts_named(message, scripts)
        if len(found) == 1:
            return found.pop(), f" (from commit {sha[:7]})"
    return None, ""


def index_row(path: Path, scripts: dict[str, Script]) -> Row:
    history = commits(path)
    row = Row(path.name, None)
    if history:
        row.date = history[-1][1]
    if path.suffix != ".json":
        row.measures = "not a JSON results file"
        return row
    try:
        rec = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        row.measures = f"unreadable JSON ({e})"
        return row
    if isinstance(rec, list):
        rec = {"rows": rec}
    if not isinstance(rec, dict):
        row.measures = f"unexpected JSON ({type(rec).__name__} at the top)"
        return row
    row.script, row.script_note = attribute(path, rec, scripts, history)
    script = scripts.get(row.script) if row.script else None
    row.measures = measures(rec, path.stem, script)
    row.commands, row.command_note = command(rec, script, path.stem, history)
    row.machine = machine(rec)
    return row


def results_files() -> list[Path]:
    """Every file in benchmarks/results/ except hidden ones and a benchmark's half-written NAME.json.tmp."""
    return sorted(p for p in RESULTS.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".tmp")


# -- the README ---------------------------------------------------------------------------------------------------

HEADER = """\
# Benchmarks

Written by `python benchmarks/index.py` from the files in `benchmarks/results/` and the git history: do not edit it
by hand, rerun the script after adding or changing a results file (`python benchmarks/index.py --check`, run by the
test suite, fails while this file is out of date).

Run the scripts from the repository root with the project's environment. The accuracy and calibration benchmarks read
the reference models and CIFAR-10/MNIST from `../shared` (or `$VITQC_SHARED`); on a shared machine give heavy runs one
thread (`--threads 1` where a script has it). Each script's docstring explains its options and method; each writes
its JSON to `benchmarks/results/`. GPU measurements run through `benchmarks/gpu_session.sh`:

```bash
{gpu}
```

Columns: **command** is the one the file records, else one rebuilt from the options it records (the row says what it
does not record and what came from the file's name), else a `python benchmarks/...` line from the message of a commit
that added or changed the file, else *not recorded*. Commands ran against the code of their date: defaults may have
changed since. **machine** is the file's own record. **date** is the day of the first commit that added the file.
{summary}
"""


def section(script: Script | None, rows: list[Row]) -> list[str]:
    if script is None:
        lines = ["## Script not recorded", "", "Neither the files nor their commits say which script wrote them."]
    else:
        lines = [f"## benchmarks/{script.stem}.py", "", script.summary, "", "```bash",
                 *(script.usage or [f"python benchmarks/{script.stem}.py --help"]), "```"]
    lines += ["", "| file | script | measures | command | machine | date |", "|---|---|---|---|---|---|"]
    lines += [r.line() for r in rows] if rows else ["| (no results files yet) | | | | | |"]
    return lines + [""]


def build() -> str:
    require_full_history()
    scripts = benchmark_scripts()
    rows = [index_row(p, scripts) for p in results_files()]
    commanded = sum(bool(r.commands) for r in rows)
    from_commits = sum("(from commit" in r.command_note for r in rows)
    summary = (f"\n{len(rows)} results files. Command: {commanded - from_commits} recorded in or rebuilt from the "
               f"file, {from_commits} from a commit message, {len(rows) - commanded} not recorded. Machine not "
               f"recorded: {sum(r.machine == NOT_RECORDED for r in rows)}.\n")
    session = BENCH / "gpu_session.sh"
    gpu = usage_lines(session.read_text().splitlines(), "#   benchmarks/") if session.exists() else []
    gpu = "\n".join(line.removeprefix("#   ") for line in gpu) or "benchmarks/gpu_session.sh"
    out = HEADER.format(gpu=gpu, summary=summary).splitlines()
    groups = [(scripts[s], [r for r in rows if r.script == s]) for s in sorted(scripts)]
    orphans = [r for r in rows if r.script is None]
    for script, group in groups + ([(None, orphans)] if orphans else []):
        out += section(script, group)
    return "\n".join(out).rstrip("\n") + "\n"


def table_rows(text: str) -> dict[str, str]:
    return {m.group(1): line for line in text.splitlines() if (m := re.match(r"\| \[([^\]]+)\]\(results/", line))}


def differences(expected: str, current: str) -> list[str]:
    """What keeps ``current`` from being ``expected``: missing, stale and extra rows, then any other text."""
    want, have = table_rows(expected), table_rows(current)
    problems = [f"missing row: {f}" for f in want if f not in have]
    problems += [f"stale row: {f}" for f in want if f in have and have[f] != want[f]]
    problems += [f"row for a file no longer in results/: {f}" for f in have if f not in want]
    others = [line for line in expected.splitlines() if line not in want.values()]
    if others != [line for line in current.splitlines() if line not in have.values()]:
        problems.append("text outside the rows differs (usage, counts or headings)")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if benchmarks/README.md is not what this writes")
    args = ap.parse_args(argv)
    text = build()
    if args.check:
        problems = differences(text, README.read_text() if README.exists() else "")
        if problems:
            print("benchmarks/README.md is out of date: " + "; ".join(problems) + "\nrun: python benchmarks/index.py",
                  file=sys.stderr)
            return 1
        print(f"benchmarks/README.md is up to date ({len(table_rows(text))} results files)")
        return 0
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(README)
    print(f"wrote {README.relative_to(ROOT)} ({len(table_rows(text))} results files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
