"""benchmarks/README.md indexes every results file and is what benchmarks/index.py writes (no torch needed)."""
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "benchmarks" / "README.md"

spec = importlib.util.spec_from_file_location("benchmarks_index", REPO / "benchmarks" / "index.py")
index = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = index  # dataclasses look their module up there
spec.loader.exec_module(index)


def full_git_history() -> bool:
    if shutil.which("git") is None:
        return False
    done = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=REPO, capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() == "false"


needs_history = pytest.mark.skipif(not full_git_history(), reason="needs a git checkout with its whole history")


def test_every_results_file_has_a_row_that_links_to_it():
    files = {p.name for p in RESULTS.iterdir()
             if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp")}
    links = dict(re.findall(r"^\| \[([^\]]+)\]\((results/[^)]+)\)", README.read_text(), re.M))
    assert files, "no results files found"
    assert sorted(files - set(links)) == [], "not in benchmarks/README.md: run python benchmarks/index.py"
    assert sorted(set(links) - files) == [], "rows for files no longer in benchmarks/results/"
    assert all((README.parent / target).is_file() for target in links.values())


@needs_history
def test_index_check_passes():
    done = subprocess.run([sys.executable, "benchmarks/index.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@needs_history
def test_check_exits_1_and_names_the_missing_and_stale_rows(tmp_path, monkeypatch, capsys):
    text = index.build()
    monkeypatch.setattr(index, "build", lambda: text)  # built once
    rows = index.table_rows(text)
    gone, changed = sorted(rows)[:2]
    damaged = text.replace(rows[gone] + "\n", "").replace(rows[changed], rows[changed][:-2] + " edited |")
    (tmp_path / "README.md").write_text(damaged)
    monkeypatch.setattr(index, "README", tmp_path / "README.md")
    assert index.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert f"missing row: {gone}" in err and f"stale row: {changed}" in err
    (tmp_path / "README.md").write_text(text)
    assert index.main(["--check"]) == 0


def test_differences_name_rows_and_other_text():
    expected = "# B\n\n| [a.json](results/a.json) | x |\n| [b.json](results/b.json) | y |\n"
    assert index.differences(expected, expected) == []
    current = "# B\n\n| [b.json](results/b.json) | old |\n| [c.json](results/c.json) | z |\n"
    assert index.differences(expected, current) == [
        "missing row: a.json", "stale row: b.json", "row for a file no longer in results/: c.json"]
    assert index.differences(expected, expected.replace("# B", "# C")) == [
        "text outside the rows differs (usage, counts or headings)"]


def test_commands_come_only_from_explicit_invocations_in_commit_messages():
    message = ("executorch_pte: --tag re-times files (prose, not a command)\n\n"
               "Measured with `python benchmarks/executorch_pte.py --model vits14_cifar10 --runs 30 --tag quiet` "
               "and python3 benchmarks/executorch_pte.py --latency-only (1,000 images).")
    assert index.commands_in(message, "executorch_pte") == [
        "python benchmarks/executorch_pte.py --model vits14_cifar10 --runs 30 --tag quiet",
        "python benchmarks/executorch_pte.py --latency-only"]
    assert index.commands_in(message, "backend_latency") == []
    assert index.scripts_named("accuracy_joint tune: --try ...; see accuracy_joint_vits14.json", ["accuracy_joint"]) \
        == {"accuracy_joint"}
    assert index.scripts_named("see accuracy_joint_vits14.json", ["accuracy_joint"]) == set()


def test_a_command_is_rebuilt_from_recorded_args_with_the_output_name_said():
    script = index.read_script(REPO / "benchmarks" / "backend_latency.py")
    args = {"models": "vits14_cifar10", "runs": 20, "compile": True, "no_fakequant": False, "tag": "",
            "device": None, "gone_option": 3}
    line, unknown, from_name = index.render(script, args, "backend_latency-mine")
    assert line == "python benchmarks/backend_latency.py --models vits14_cifar10 --runs 20 --compile --tag mine"
    assert unknown == ["gone_option"] and from_name == ["--tag mine"]


def test_machine_is_the_files_record_or_not_recorded():
    assert index.machine({"machine": "AMD EPYC, 1 threads, no GPU"}) == "AMD EPYC, 1 threads, no GPU"
    assert index.machine({"machine": {"cpu": "x86_64", "cores": 2, "threads": 1}}) == "x86_64, 2 cores, 1 threads, no GPU"
    assert index.machine({"cores": 2}) == "2 cores (CPU model not recorded)"
    assert index.machine({"rows": [{"top1": 0.5}]}) == index.NOT_RECORDED
