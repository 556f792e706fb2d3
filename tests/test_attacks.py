"""Adversarial robustness (compress/deploy/attacks.py): FGSM and PGD on the [0, 1] pixel scale, robust top-1, the
`measure.*` keys, the robust columns in metrics.csv, and one end-to-end smoke run."""
from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress import CompressError
from compress.data.base import TensorSplit
from compress.data.synthetic import make_synthetic
from compress.deploy import attacks
from compress.job.compose import compose
from compress.report import results
from compress.training import train
from tests.conftest import compress_cli

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
SIZE, CLASSES = 8, 10


def split(n: int, seed: int) -> TensorSplit:
    x, y = make_synthetic(n, CLASSES, SIZE, seed=seed)
    return TensorSplit(x, y, torch.tensor(MEAN), torch.tensor(STD), channels_last=True)


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, CLASSES))


def conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, CLASSES))


@pytest.fixture(scope="module")
def trained():
    """A tiny conv model trained on the synthetic gratings for a few epochs (clean top-1 ~75 %, chance 10 %);
    one thread, so the numbers are the same on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            model = conv_model()
            data = split(512, seed=1)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            g = torch.Generator().manual_seed(0)
            for _ in range(4):
                for x, y in data.batches(64, shuffle=True, generator=g):
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
        yield model.eval()
    finally:
        torch.set_num_threads(threads)


def pixels_and_labels(n: int = 32, seed: int = 2):
    x, y = next(split(n, seed).batches(n))
    return attacks.to_pixels(x, MEAN, STD), y


# -- the attacks ------------------------------------------------------------------------------------------------
def test_fgsm_is_the_hand_computed_sign_gradient_step_on_a_linear_model():
    model = linear_model(3)
    p, y = pixels_and_labels()
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    logits = ((p - mean) / std).flatten(1) @ weight.T + bias
    # d(sum CE)/d logits = softmax - onehot; through the linear layer and the normalisation:
    dlogits = logits.softmax(1) - F.one_hot(y, CLASSES).float()
    grad = (dlogits @ weight).view_as(p) / std
    expected = (p + 0.03 * grad.sign()).clamp(0, 1)
    adv = attacks.fgsm(model, p, y, 0.03, MEAN, STD)
    assert torch.equal(adv, expected)
    assert not torch.equal(adv, p)


@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_pgd_with_one_step_of_size_eps_and_no_random_start_is_fgsm(eps):
    model = conv_model(1)
    p, y = pixels_and_labels()
    one_step = attacks.pgd(model, p, y, eps, steps=1, step_size=eps, mean=MEAN, std=STD, random_start=False)
    assert torch.equal(one_step, attacks.fgsm(model, p, y, eps, MEAN, STD))


@pytest.mark.parametrize("eps", [0.0, 0.02, 0.3, 1.0])
def test_adversarial_images_stay_in_the_pixel_range_and_the_eps_ball(eps):
    model = conv_model(2)
    p, y = pixels_and_labels()
    g = torch.Generator().manual_seed(0)
    for adv in (attacks.fgsm(model, p, y, eps, MEAN, STD),
                attacks.pgd(model, p, y, eps, steps=5, step_size=0.5, mean=MEAN, std=STD, generator=g),
                attacks.pgd(model, p, y, eps, steps=3, step_size=None, mean=MEAN, std=STD, random_start=False)):
        assert adv.shape == p.shape and adv.dtype == torch.float32 and not adv.requires_grad
        assert adv.min() >= 0 and adv.max() <= 1
        assert (adv - p).abs().max() <= eps + 1e-6


def test_attacks_keep_no_parameter_gradients_and_restore_the_mode():
    model = conv_model(4).train()
    p, y = pixels_and_labels()
    running_mean = model[1].running_mean.clone()
    attacks.fgsm(model, p, y, 0.05, MEAN, STD)
    attacks.pgd(model, p, y, 0.05, 3, None, MEAN, STD, torch.Generator().manual_seed(0))
    assert all(param.grad is None for param in model.parameters())
    assert model.training  # restored; the attacks themselves ran in eval mode:
    assert torch.equal(model[1].running_mean, running_mean)


def test_pgd_random_start_is_seeded(trained):
    p, y = pixels_and_labels()
    runs = [attacks.pgd(trained, p, y, 0.05, 3, None, MEAN, STD, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    test = split(100, seed=3)
    options = dict(mean=MEAN, std=STD, batch_size=64, pgd_steps=3, seed=5)
    assert (attacks.robust_top1(trained, test, "pgd", 0.05, **options)
            == attacks.robust_top1(trained, test, "pgd", 0.05, **options))


# -- robust top-1 -------------------------------------------------------------------------------------------------
def test_epsilon_zero_is_the_clean_accuracy_exactly(trained):
    test = split(150, seed=3)  # batches of 64, 64, 22
    for model in (trained, conv_model(5)):
        clean = train.evaluate(model, test, torch.device("cpu"), batch_size=64)["top1"]
        got = attacks.robust_accuracies(model, test, ["fgsm", "pgd"], [0.0, 0.02], mean=MEAN, std=STD, batch_size=64)
        assert got[("fgsm", 0.0)] == got[("pgd", 0.0)] == clean
        assert attacks.robust_top1(model, test, "pgd", 0.0, mean=MEAN, std=STD, batch_size=64) == clean


def test_fgsm_accuracy_does_not_rise_with_epsilon_on_a_trained_model(trained):
    test = split(300, seed=3)
    epsilons = [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]  # CFDP's Table 8, and finer below 0.05
    got = attacks.robust_accuracies(trained, test, ["fgsm"], epsilons, mean=MEAN, std=STD, batch_size=128)
    curve = [got[("fgsm", e)] for e in epsilons]
    assert curve[0] > 60, f"the toy model did not learn: {curve[0]}"
    assert all(a >= b for a, b in zip(curve, curve[1:])), curve
    assert curve[1] < curve[0] and curve[-1] < 10, curve


def test_attack_images_takes_the_first_images(trained):
    test = split(100, seed=3)
    first40 = TensorSplit(test.images[:40], test.labels[:40], test.mean, test.std)
    options = dict(mean=MEAN, std=STD, batch_size=16)
    assert (attacks.robust_top1(trained, test, "fgsm", 0.03, images=40, **options)
            == attacks.robust_top1(trained, first40, "fgsm", 0.03, **options))


def test_column_names():
    assert attacks.column("fgsm", 0.0) == attacks.column("fgsm", -0.0) == "robust_top1_fgsm_eps0"
    assert attacks.column("pgd", 0.05) == "robust_top1_pgd_eps0.05"
    assert attacks.column("fgsm", 1.0) == "robust_top1_fgsm_eps1"
    assert attacks.column("fgsm", 8 / 255) == "robust_top1_fgsm_eps0.03137254901960784"


# -- config ------------------------------------------------------------------------------------------------------
def test_measure_defaults_are_cfdps_table_8():
    m = compose([]).measure
    assert m.attacks == [] and m.epsilons == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert m.pgd_steps == 10 and m.pgd_step_size is None and m.pgd_random_start and m.attack_images is None
    m = compose(["measure.attacks=[fgsm,pgd]", "measure.epsilons=[0,0.03]", "measure.attack_images=100"]).measure
    assert m.attacks == ["fgsm", "pgd"] and m.epsilons == [0.0, 0.03] and m.attack_images == 100


@pytest.mark.parametrize("override, key", [
    ("measure.attacks=[fgsm,cw]", "measure.attacks"), ("measure.attacks=[pgd,pgd]", "measure.attacks"),
    ("measure.epsilons=[-0.1]", "measure.epsilons"), ("measure.epsilons=[0.1,2]", "measure.epsilons"),
    ("measure.epsilons=[0.1,0.1]", "measure.epsilons"), ("measure.epsilons=[0,-0.0]", "measure.epsilons"),
    ("measure.epsilons=[nan]", "measure.epsilons"),
    ("measure.pgd_steps=0", "measure.pgd_steps"), ("measure.pgd_steps=100000", "measure.pgd_steps"),
    ("measure.pgd_step_size=0", "measure.pgd_step_size"), ("measure.pgd_step_size=-1", "measure.pgd_step_size"),
    ("measure.attack_images=0", "measure.attack_images"),
])
def test_bad_attack_settings_name_their_key(override, key):
    with pytest.raises(CompressError) as e:
        compose([override])
    assert str(e.value).startswith(f"{key}: ") and "\n" not in str(e.value)


def test_attacks_need_an_epsilon():
    with pytest.raises(CompressError, match=r"^measure\.epsilons: "):
        compose(["measure.attacks=[fgsm]", "measure.epsilons=[]"])


# -- metrics.csv -------------------------------------------------------------------------------------------------
def test_robust_columns_are_added_after_the_fixed_columns_and_gathered(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    path.parent.mkdir()
    base = {c: "" for c in results.COLUMNS}
    robust = {"robust_top1_fgsm_eps0": 80.0, "robust_top1_fgsm_eps0.05": 41.5, "robust_top1_pgd_eps0.05": 12.25}
    results.append_row(path, {**base, "stage": "baseline", "top1": 80.0})
    results.append_row(path, {**base, "stage": "compressed", "top1": 70.0})
    results.append_row(path, {**base, "stage": "final", "top1": 80.0, **robust, "not_a_column": 1})
    with path.open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == results.COLUMNS + list(robust)
    assert [r["stage"] for r in table] == ["baseline", "compressed", "final"]
    assert table[0]["robust_top1_fgsm_eps0"] == "" and table[2]["robust_top1_pgd_eps0.05"] == "12.25"
    # Resume rewrites the file from the state's rows: the same header.
    rows = [{**base, "stage": "baseline", "top1": 80.0}, {**base, "stage": "final", "top1": 80.0, **robust}]
    results.write_rows(path, rows)
    with path.open() as f:
        assert next(csv.reader(f)) == results.COLUMNS + list(robust)
    df = results.gather([tmp_path])
    assert df.loc[df["stage"] == "final", "robust_top1_fgsm_eps0.05"].item() == 41.5


# -- end to end ----------------------------------------------------------------------------------------------------
def test_smoke_run_writes_robust_columns_on_the_final_row(tmp_path):
    run_dir = tmp_path / "run"
    compress_cli("run", "debug=smoke", "arch=resnet20", "method=none", "threads=1", "measure.latency=false",
                 f"paths.cache={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}", "measure.attacks=[fgsm,pgd]",
                 "measure.epsilons=[0,0.03]", "measure.pgd_steps=2", check=True)
    with (run_dir / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    names = ["robust_top1_fgsm_eps0", "robust_top1_fgsm_eps0.03", "robust_top1_pgd_eps0", "robust_top1_pgd_eps0.03"]
    assert list(table[0]) == results.COLUMNS + names
    final = table[-1]
    assert final["stage"] == "final" and all(final[n] != "" for n in names)
    assert float(final["robust_top1_fgsm_eps0"]) == float(final["robust_top1_pgd_eps0"]) == float(final["top1"])
    assert all(0 <= float(final[n]) <= 100 for n in names)
    assert all(r[n] == "" for r in table[:-1] for n in names)
