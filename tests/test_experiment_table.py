"""The ApproxConv paper's rows are a table (configs/tables/approxconv.csv), registered as experiments.

In process, no runs: the table is well formed, a few rows compose to what their paper row says, every row
composes, and (where git history is at hand) every row composes to exactly the config its old
hand-written YAML file composed to.
"""
from __future__ import annotations

import math
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from compress.job.experiments import SCHEDULES, experiment_node
from compress.report.papers import APPROXCONV_DATASETS, approxconv_rows, parse_harmonics, read_rows
from tests.conftest import REPO

ROWS = approxconv_rows()
NAMES = [row.name for row in ROWS]
# The last commit with the 65 hand-written files configs/experiment/approxconv_*.yaml.
LEGACY_COMMIT = "cead47eecab8df5f4b40deff29d970d37e46e288"


def configs_dir() -> Path:
    return Path(str(resources.files("compress.configs")))


def compose_in(overrides: list[str]):
    """The composed DictConfig, hydra.runtime.choices included (inside `initialize_config_dir`)."""
    return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.fixture(scope="module")
def compose_with():
    """compose(overrides) on the installed configs, with the schemas and the table registered."""
    from compress.job.compose import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        yield lambda overrides: compose_in(overrides)


# -- the table -----------------------------------------------------------------------------------------------
def test_the_table_holds_every_paper_row_once():
    assert len(ROWS) == 65 and len(set(NAMES)) == 65
    assert all(name.startswith("approxconv_") for name in NAMES)
    assert {row.table for row in ROWS} == {"1", "2", "3", "4"}
    assert {row.dataset for row in ROWS} <= set(APPROXCONV_DATASETS) == set(SCHEDULES)  # each data set has its schedule
    printed = {"1": ("paper_pre_top1", "paper_post_top1", "paper_params_m"),
               "2": ("paper_pre_top1", "paper_post_top1", "paper_params_m"),
               "3": ("paper_pre_top1", "paper_post_top1", "paper_params_m"),
               "4": ("paper_quant_top1", "paper_size_mb")}
    for row in ROWS:  # the paper's numbers are kept as printed, each table's columns filled
        filled = tuple(key for key, value in row.paper.items()
                       if key.startswith("paper_") and key != "paper_row" and value)
        assert filled == printed[row.table], row.name
        assert all(float(row.paper[key]) > 0 for key in filled)


def test_every_row_links_its_published_row_with_the_same_numbers():
    """`paper_row` names the row of configs/tables/published.csv that the experiment reproduces, and the two
    copies of the paper's numbers agree (Table 1's params column is ResNet-32's: published keeps it on the
    ResNet-32 entry only)."""
    from compress.report import papers

    assert len({row.paper_row for row in ROWS}) == len(ROWS)
    for row in ROWS:
        assert row.paper_row and row.paper["paper_row"] == row.paper_row, row.name
        published = papers.row(row.paper_row)
        paper = {key: float(value) if value else math.nan for key, value in row.paper.items()
                 if key.startswith("paper_") and key != "paper_row"}
        if row.table == "4":
            assert published["top1"] == paper["paper_quant_top1"], row.name
            assert f"model size {row.paper['paper_size_mb']} MB" in published["note"], row.name
            continue
        assert (published["pre_top1"], published["top1"]) == (paper["paper_pre_top1"], paper["paper_post_top1"]), row.name
        params = papers.row(row.paper_row.replace("-resnet20-", "-resnet32-")) if row.arch == "resnet20" else published
        assert params["params"] == round(paper["paper_params_m"] * 1e6), row.name


def test_harmonics_cells_become_the_method_option():
    assert parse_harmonics("3,3,2,2") == [3, 3, 2, 2]
    assert parse_harmonics("7x3,7x3,5x9,4x3") == "7x3,7x3,5x9,4x3"
    assert parse_harmonics("") is None


def test_a_malformed_table_fails_loudly():
    header = "name,table,arch,dataset,series,harmonics,quant_bits,paper_row\n"
    with pytest.raises(ValueError, match="duplicate names a"):
        read_rows(header + "a,1,resnet20,cifar10,cos,\"2,2,2,2\",,p\n" * 2)
    with pytest.raises(ValueError, match="dataset must be one of"):
        read_rows(header + "a,1,resnet20,mnist,cos,\"2,2,2,2\",,p\n")
    with pytest.raises(ValueError, match="missing columns quant_bits"):
        read_rows("name,table,arch,dataset,series,harmonics,paper_row\na,1,resnet20,cifar10,cos,2,p\n")
    with pytest.raises(ValueError, match="missing columns paper_row"):
        read_rows("name,table,arch,dataset,series,harmonics,quant_bits\na,1,resnet20,cifar10,cos,2,\n")
    with pytest.raises(ValueError, match="row a: paper_row is empty"):
        read_rows(header + "a,1,resnet20,cifar10,cos,\"2,2,2,2\",, \n")


def test_nodes_override_only_what_a_row_sets():
    by_name = {row.name: row for row in ROWS}
    assert experiment_node(by_name["approxconv_resnet20_cos_3322"]) == {
        "defaults": [{"override /arch": "resnet20"}, {"override /method": "approxconv"},
                     {"override /schedule": "approxconv_cifar"}],
        "method": {"series": "cos", "harmonics": [3, 3, 2, 2]},
        "paper_row": "approxconv-t1-resnet20-cos-3322",
    }
    assert experiment_node(by_name["approxconv_resnet18_imagenet_conv2d_q8"]) == {
        "defaults": [{"override /dataset": "imagenet"}, {"override /arch": "resnet18_imagenet"},
                     {"override /method": "approxconv"}, {"override /schedule": "approxconv_imagenet"}],
        "method": {"harmonics": None, "quant_bits": 8},
        "paper_row": "approxconv-t4-resnet18_imagenet-conv2d-q8",
    }


# -- composed ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("approxconv_resnet20_cos_3322", dict(arch="resnet20", dataset="cifar10", schedule="approxconv_cifar",
                                          series="cos", harmonics=[3, 3, 2, 2], quant_bits=None)),
    ("approxconv_resnet18_imagenet_cos_63322_q4", dict(arch="resnet18_imagenet", dataset="imagenet",
                                                       schedule="approxconv_imagenet", series="cos",
                                                       harmonics=[6, 3, 3, 2, 2], quant_bits=4)),
    ("approxconv_convnext_tiny_imagenet_cos_7x3_7x3_7x4_6x5_6x3",
     dict(arch="convnext_tiny_imagenet", dataset="imagenet", schedule="approxconv_imagenet", series="cos",
          harmonics="7x3,7x3,7x4,6x5,6x3", quant_bits=None)),
    ("approxconv_resnet18_imagenet_conv2d_q8", dict(arch="resnet18_imagenet", dataset="imagenet",
                                                    schedule="approxconv_imagenet", series="cos", harmonics=None,
                                                    quant_bits=8)),
])
def test_rows_compose_to_their_paper_settings(compose_with, name, expected):
    cfg = compose_with([f"experiment={name}"])
    choices = cfg.hydra.runtime.choices
    assert (choices.experiment, choices.arch, choices.dataset, choices.method, choices.schedule) == (
        name, expected["arch"], expected["dataset"], "approxconv", expected["schedule"])
    assert (cfg.arch.name, cfg.dataset.name, cfg.method.name) == (expected["arch"], expected["dataset"], "approxconv")
    harmonics = cfg.method.harmonics
    assert (OmegaConf.to_container(harmonics) if OmegaConf.is_list(harmonics) else harmonics) == expected["harmonics"]
    assert (cfg.method.series, cfg.method.quant_bits) == (expected["series"], expected["quant_bits"])
    assert cfg.schedule.epochs == 5 and cfg.schedule.lr == 1e-3  # the public code's fine-tuning recipes
    assert cfg.paper_row == next(row.paper_row for row in ROWS if row.name == name)


@pytest.mark.slow  # make test composes every experiment already (tests/test_method_contract.py)
def test_every_row_composes(compose_with):
    for name in NAMES:
        assert compose_with([f"experiment={name}"]).hydra.runtime.choices.experiment == name


def legacy_file(name: str) -> str | None:
    """The old hand-written YAML of experiment `name` at LEGACY_COMMIT, or None without that history."""
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:configs/experiment/{name}.yaml"], cwd=REPO,
                          capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


@pytest.mark.slow  # ~20 s: 130 compositions; it proved the table equal to the files it replaced
def test_every_row_composes_exactly_as_its_old_yaml_file(tmp_path):
    """The old files, put back as a group of their own beside today's configs, compose to the same config
    as the table's rows (the whole config as YAML text, key order included), but for `paper_row`, which
    the old files did not set."""
    legacy = {name: legacy_file(name) for name in NAMES}
    if any(text is None for text in legacy.values()):
        pytest.skip(f"needs the git history of commit {LEGACY_COMMIT} (the old experiment files)")
    config_dir = tmp_path / "configs"
    shutil.copytree(configs_dir(), config_dir, ignore=shutil.ignore_patterns("__pycache__"))
    (config_dir / "legacy_experiment").mkdir()
    for name, text in legacy.items():
        (config_dir / "legacy_experiment" / f"{name}.yaml").write_text(text)
    from compress.job.compose import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        for name in NAMES:
            new = compose_in([f"experiment={name}"])
            old = compose_in([f"+legacy_experiment={name}"])
            assert new.paper_row == next(row.paper_row for row in ROWS if row.name == name) and old.paper_row is None
            new.paper_row = None
            for cfg in (new, old):
                with open_dict(cfg):
                    del cfg["hydra"]
            assert OmegaConf.to_yaml(new) == OmegaConf.to_yaml(old), name
