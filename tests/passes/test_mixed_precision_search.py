import random

import pytest
import torch

import vitqc
from tests.conftest import crash_after, run_cli, tiny_vit
from vitqc.passes import mixed_precision_search as mps
from vitqc.precision.budget import Budget
from vitqc.precision.evolution import SearchState
from vitqc.precision.fitness import patch_contrastive, sensitivity_seeds
from vitqc.precision.genes import Gene
from vitqc.precision.table import assignment_table
from vitqc.pipeline import Pipeline, load_pipeline
from vitqc.quant.modules import INT_LAYERS, QUANT_LAYERS


def search_pipeline(**options):
    opts = {"population": 6, "generations": 3, "images": 32, **options}
    return Pipeline.from_list([
        "canonicalize", ("insert_quantizers", {"weight_bits": 4, "act_bits": 4, "keep": {"head": 8}}),
        ("mixed_precision_search", opts),
    ])


def searched(calib, **options):
    gm = vitqc.compile(tiny_vit(), search_pipeline(**options), calib, quiet=True).quantized
    return gm, gm.meta["vitqc"]["record"]


def test_assignment_meets_the_budget_and_is_at_least_as_fit_as_uniform(calib):
    gm, record = searched(calib)
    r = record["mixed_precision_search"]
    assert r["average_weight_bits"] <= 4.0 + 1e-9 and r["average_act_bits"] <= 4.0 + 1e-9
    # uniform W4A4 is in the first population and elites survive, so the result can only be as fit or fitter
    assert r["uniform_fitness"] is not None and r["fitness"] <= r["uniform_fitness"]
    assert r["best_per_generation"] == sorted(r["best_per_generation"], reverse=True)
    # recomputing the averages from the modules themselves gives the recorded numbers
    layers = {p: m for p, m in gm.named_modules() if isinstance(m, QUANT_LAYERS) and p != "head"}
    w = sum(m.weight.numel() * m.weight_quantizer.bits for m in layers.values()) / sum(
        m.weight.numel() for m in layers.values())
    assert w == pytest.approx(r["average_weight_bits"], abs=1e-4)
    assert gm.get_submodule("head").weight_quantizer.bits == 8  # fixed layers keep their width


def test_layer_table_and_quantizers_carry_the_chosen_widths(calib):
    gm, record = searched(calib, weight_choices=[3, 4, 8], act_choices=[4, 8], act_bits=6.0)
    chosen = {row["path"]: row for row in record["mixed_precision_search"]["layers"]}
    table = {row["path"]: row for row in gm.meta["vitqc"]["layers"]}
    for path, row in chosen.items():
        if "weight_bits" in row:
            module = gm.get_submodule(path)
            assert module.weight_quantizer.bits == row["weight_bits"] == table[path]["weight_bits"]
            assert module.input_quantizer.bits == row["act_bits"] == table[path]["act_bits"]
        else:  # an attention group: every matmul/softmax entry of that module has the group's width
            entries = [t for p, t in table.items() if p.rpartition(".")[0] == path and t["kind"] in ("matmul", "softmax")]
            assert entries and all(t["act_bits"] == row["act_bits"] for t in entries)
    assert any(row.get("act_bits") == 8 for row in chosen.values())  # a 6-bit budget lets some layers reach 8


def test_same_seed_gives_the_same_assignment(calib):
    a = searched(calib)[1]["mixed_precision_search"]
    b = searched(calib)[1]["mixed_precision_search"]
    assert a["layers"] == b["layers"] and a["fitness"] == b["fitness"]


def test_model_size_budget(calib):
    gm, record = searched(calib, model_mb=0.0085)
    r = record["mixed_precision_search"]
    assert r["weight_mb"] <= 0.0085 + 1e-9
    codes_bits = sum(m.weight.numel() * m.weight_quantizer.bits for m in gm.modules() if isinstance(m, QUANT_LAYERS))
    assert codes_bits / 8e6 == pytest.approx(r["weight_mb"], abs=1e-4)


def test_resume_continues_to_the_same_result(tmp_path, calib, monkeypatch):
    pipe = search_pipeline(generations=4)
    uninterrupted = vitqc.compile(tiny_vit(), pipe, calib, quiet=True).quantized.meta["vitqc"]["record"]["mixed_precision_search"]
    crash_after(monkeypatch, SearchState, "save", lambda state: state.generation == 2)
    with pytest.raises(KeyboardInterrupt):
        vitqc.compile(tiny_vit(), pipe, calib, quiet=True, work_dir=str(tmp_path)).quantized
    monkeypatch.undo()
    resumed = vitqc.compile(tiny_vit(), pipe, calib, quiet=True, work_dir=str(tmp_path), resume=True).quantized
    r = resumed.meta["vitqc"]["record"]["mixed_precision_search"]
    assert r["resumed_from"] == 2
    assert r["layers"] == uninterrupted["layers"] and r["best_per_generation"] == uninterrupted["best_per_generation"]

    with pytest.raises(vitqc.VitqcError, match="other mixed_precision_search options"):
        vitqc.compile(tiny_vit(), search_pipeline(generations=4, population=7), calib, quiet=True,
                      work_dir=str(tmp_path), resume=True).quantized


def test_bad_options_fail_with_one_line(calib):
    with pytest.raises(vitqc.VitqcError, match="activations cannot be ternary"):
        searched(calib, act_choices=[1.58, 4])
    with pytest.raises(vitqc.VitqcError, match="smallest width exceeds the weight budget"):
        searched(calib, weight_bits=2.5)
    with pytest.raises(vitqc.VitqcError, match="population >= 2"):
        searched(calib, population=1)


def test_repair_and_fill_fits_and_leaves_no_room():
    genes = [Gene(f"l{i}", "weight", [], size, [3, 4, 6, 8]) for i, size in enumerate((100, 50, 10))]
    genes.append(Gene("a", "act", [], 10, [4, 8]))
    budget = Budget(genes, mps.MixedPrecisionSearchOptions(weight_bits=5.0, act_bits=4.0), 0.0)
    rng = random.Random(0)
    for _ in range(50):
        genome = budget.repair_and_fill([rng.randrange(4), rng.randrange(4), rng.randrange(4), rng.randrange(2)], rng)
        assert budget.fits(genome)
        for i, g in enumerate(genes):  # full: no single gene can go up and still fit
            if genome[i] + 1 < len(g.choices):
                raised = list(genome)
                raised[i] += 1
                assert not budget.fits(raised)


def test_patch_contrastive_prefers_matching_tokens():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 9, 16, generator=g)
    close = teacher + 0.05 * torch.randn(2, 9, 16, generator=g)
    shuffled = close[:, torch.randperm(9, generator=g)]
    assert patch_contrastive(close, teacher, 0.1) < patch_contrastive(shuffled, teacher, 0.1)
    assert patch_contrastive(teacher, teacher, 0.1) < 0.05  # own token far more similar than the others


def test_mp_joint_pipeline_ends_materialized_with_mixed_widths(calib):
    pipe = load_pipeline("mp-joint").with_overrides([
        "mixed_precision_search.population=4", "mixed_precision_search.generations=2",
        "mixed_precision_search.images=32", "joint_optimize.iterations=3", "joint_optimize.batch_size=8"])
    gm = vitqc.compile(tiny_vit(), pipe, calib, quiet=True).quantized
    widths = {m.weight_bits for m in gm.modules() if isinstance(m, INT_LAYERS)}
    record = gm.meta["vitqc"]["record"]
    assert record["mixed_precision_search"]["average_weight_bits"] <= 4.0 + 1e-9
    assert record["joint_optimize"]["iterations"] == 3
    assert widths <= {3, 4, 6, 8} and 8 in widths  # head and patch embedding stay at 8
    x = calib[0]
    assert gm(x).shape == (len(x), 5)


def test_a_search_with_one_choice_leaves_the_rest_of_the_pipeline_unchanged(calib):
    """The search observes activations; the calibration after it must record exactly what it would without."""
    def run(with_search: bool):
        steps = ["canonicalize", ("insert_quantizers", {"weight_bits": 4, "act_bits": 4, "keep": {"head": 8}})]
        if with_search:
            steps.append(("mixed_precision_search", {"population": 2, "elite": 1, "generations": 1, "images": 32,
                                                     "weight_choices": [4], "act_choices": [4]}))
        steps += [("calibrate", {"method": "mse", "max_images": 32})]
        gm = vitqc.compile(tiny_vit(), Pipeline.from_list(steps), calib, quiet=True).quantized
        return {k: v for k, v in gm.state_dict().items()}

    plain, searched_state = run(False), run(True)
    assert plain.keys() == searched_state.keys()
    for key in plain:
        assert torch.equal(plain[key], searched_state[key]), key


def test_cli_refuses_bad_choices_before_any_work(tmp_path, capsys):
    out = tmp_path / "m.vitqc"
    code, _, err = run_cli(["compile", "demo", "--pipeline", "mp-joint", "--set",
                            "mixed_precision_search.act_choices=[1.58,4]", "--out", out], capsys)
    assert code == 2 and err.strip() == "error: mixed_precision_search.act_choices: activations cannot be ternary; drop 1.58"
    assert not out.exists() and not list(tmp_path.iterdir())


def test_assignment_table_lists_every_searched_layer(calib):
    from rich.console import Console

    record = searched(calib)[1]["mixed_precision_search"]
    console = Console(record=True, width=200)
    console.print(assignment_table(record))
    text = console.export_text()
    for row in record["layers"]:
        assert row["path"] in text
    assert f"{record['evaluations']} candidates scored" in text and "uniform:" in text


def test_sensitivity_seeds_fit_the_budget_and_the_search_records_their_cost(calib):
    gm, record = searched(calib)
    r = record["mixed_precision_search"]
    genes = len(r["layers"]) * 2 - sum("weight_bits" not in row for row in r["layers"])  # attention rows: one gene
    # one width down and one up per gene, plus uniform, plus at most one climb step per gene
    assert 2 * genes + 1 <= r["sensitivity_evaluations"] <= 3 * genes + 1
    off = searched(calib, sensitivity=False)[1]["mixed_precision_search"]
    assert off["sensitivity_evaluations"] == 0 and off["evaluations"] < r["evaluations"]


def test_the_sensitivity_climb_only_keeps_improvements():
    """On a made-up fitness where raising gene 0 helps most and lowering 1 and 2 costs less than that, the climb
    moves 0 up (two bits), pays with 1 and 2, and returns only assignments better than uniform."""
    genes = [Gene(f"l{i}", "weight", [], 100, [3, 4, 6]) for i in range(3)]
    budget = Budget(genes, mps.MixedPrecisionSearchOptions(weight_bits=4.0), 0.0)
    cost = {0: {0: 1.0, 1: 0.0, 2: -2.0}, 1: {0: 0.1, 1: 0.0, 2: -0.05}, 2: {0: 0.5, 1: 0.0, 2: -0.01}}
    fitness = lambda genome: 5.0 + sum(cost[i][c] for i, c in enumerate(genome))  # noqa: E731
    seeds, evaluations = sensitivity_seeds(genes, budget, (1, 1, 1), fitness, quiet=True)
    assert seeds == [(2, 0, 0)] and fitness(seeds[0]) < fitness((1, 1, 1)) and budget.fits(seeds[0])
    assert evaluations == 1 + 6 + 1  # uniform, one down and one up per gene, one climb step (1 and 2 are spent)


def test_finalists_are_rescored_after_a_short_joint_optimization(calib):
    prefix = ["canonicalize", ("insert_quantizers", {"weight_bits": 4, "act_bits": 4, "keep": {"head": 8}}),
              "channel_rescale", "weight_refine"]
    search = ("mixed_precision_search", {"population": 6, "generations": 3, "images": 32, "finalists": 2,
                                         "finalist_iterations": 3, "finalist_batch_size": 8})
    gm = vitqc.compile(tiny_vit(), Pipeline.from_list(prefix + [search]), calib, quiet=True).quantized
    r = gm.meta["vitqc"]["record"]["mixed_precision_search"]
    rows = r["finalists"]
    assert 2 <= len(rows) <= 3 and sum(row["uniform"] for row in rows) == 1  # the two best, and uniform
    chosen = [row for row in rows if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["fitness_after_joint"] == min(row["fitness_after_joint"] for row in rows)
    assert any(row["fitness_after_joint"] != row["fitness"] for row in rows)  # the short runs changed something
    # the graph comes back as the search left it: rescaling factors and refinements as initialised, untrained
    start = vitqc.compile(tiny_vit(), Pipeline.from_list(prefix), calib, quiet=True).quantized.state_dict()
    learned = [k for k in start if k.endswith(("log_factors", "refinement"))]
    assert learned and all(torch.equal(start[k], gm.state_dict()[k]) for k in learned)
    assert not getattr(gm, "_vitqc_joint_optimized", False)
