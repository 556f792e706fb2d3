"""The typed configuration of `compress run`: Hydra structured configs.

Every key of every config group has a type and a default here, and only here. The YAML files in
`configs/` are named presets: they set what differs from these defaults. Hydra checks each override's
type against these dataclasses while composing (`method.lam=abc`, `seed=true`, an unknown key: one line,
exit 2); `OmegaConf.to_object` then builds the dataclasses, whose `__post_init__` checks ranges and
choices and raises `CompressError("<key>: ...")`.

Groups: `dataset` (DatasetConfig), `arch` (ArchConfig), `method` (each method's own `Options`, registered
from `compress.methods.METHODS`), `schedule` and `pretrain` (ScheduleConfig), `measure`, `paths`,
`limits` (caps for quick runs; the `debug=smoke` preset sets them), `experiment` (YAML files and the
ApproxConv table in `configs/tables/`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from compress import CompressError
from compress.checks import MAX_COUNT, fail, int_in, is_count, is_number, number_in, require, require_choice, unknown_key

MAX_SEED = 2**32 - 1
MAX_THREADS = 128  # more OpenMP threads than this only costs memory (thread stacks) on any machine we know


VAL_SOURCES = ("train", "test")


DATASETS = ("cifar10", "imagefolder", "imagenet", "synthetic")
BAD_FILES = ("skip", "error")
MAX_CACHE_MB = 1_000_000  # a terabyte: beyond any machine's memory, so any bound a user means is in range


@dataclass
class DatasetConfig:
    name: str = "cifar10"          # cifar10 | imagefolder | imagenet | synthetic
    root: Optional[str] = None     # data folder; null: look for <name>/ in each of paths.data (imagefolder: required)
    download: bool = False         # let torchvision download CIFAR-10 into root when missing (needs internet)
    # null: the data's own class count (CIFAR-10: 10, imagefolder: its class folders, synthetic: 10); a value
    # that disagrees with the data stops the run (synthetic: generates that many classes).
    num_classes: Optional[int] = None
    image_size: int = 32           # the side the model sees (imagefolder: shorter side resized to it, centre crop)
    # Where the validation images (every decision: best epoch, rollback, accuracy-driven methods) come from:
    # train: `val_size` images held out of the training set; test: a fixed half of the test set (chosen by
    # split_seed), the other half being the reported test set. Use test for checkpoints trained on the whole
    # training set (the published CIFAR ResNets): a split of train/ reads ~100 % for them, so decisions are blind.
    val_from: str = "train"        # train | test
    # with val_from=train: held out of the training set (ignored with test); null: a tenth of the training
    # images, at least 1 (the imagefolder preset's choice, for folders of a few hundred images)
    val_size: Optional[int] = 5000
    train_size: Optional[int] = None   # limit the training images (quick runs); null: all that remain after val
    test_size: Optional[int] = None    # limit the test images; null: all of them
    split_seed: int = 0            # the val split is fixed by this, not by the run seed
    # imagefolder: decode every image once into a uint8 cache (paths.cache) when the decoded pixels
    # (images x 3 x image_size^2 bytes) fit in this many MiB; otherwise stream batches from the files.
    cache_max_mb: int = 2048
    # A file that cannot be read as an image (not an image, truncated; CIFAR-10: not 32x32), or an empty
    # class folder: skip (one warning line counting them and naming the first) | error (stop, naming it).
    bad_files: str = "skip"

    def __post_init__(self) -> None:
        require_choice(self.name, "dataset.name", DATASETS)
        require_choice(self.val_from, "dataset.val_from", VAL_SOURCES)
        int_in("dataset.num_classes", self.num_classes, 2, 100_000, allow_none=True)
        int_in("dataset.image_size", self.image_size, 8, 1024)
        require(self.val_size is None or is_count(self.val_size, 1, MAX_COUNT), "dataset.val_size",
                f"an integer in [1, {MAX_COUNT}] or null (a tenth of the training images)", self.val_size)
        int_in("dataset.train_size", self.train_size, 1, allow_none=True)
        int_in("dataset.test_size", self.test_size, 1, allow_none=True)
        int_in("dataset.split_seed", self.split_seed, 0, MAX_SEED)
        int_in("dataset.cache_max_mb", self.cache_max_mb, 0, MAX_CACHE_MB)
        require_choice(self.bad_files, "dataset.bad_files", BAD_FILES)


# arch.checkpoint values that ask for weights from a model hub: no downloads here for the generic sources
HUB_CHECKPOINTS = ("torchvision", "timm", "hub", "pretrained", "imagenet")
MAX_KWARGS = 100


@dataclass
class ArchConfig:
    """The model: where its architecture comes from (`source`; presets arch=torchvision / timm / module for
    the generic ones, arch=<name> for the papers'), and its starting weights (`checkpoint`)."""

    # compress: the papers' architectures by name (configs/arch/<name>.yaml) | torchvision: any classification
    # builder of torchvision.models | timm: any timm model (optional extra) | module: your own code (target)
    source: str = "compress"
    name: Optional[str] = MISSING  # the architecture (compress, torchvision, timm); unused with module
    target: Optional[str] = None   # module: "package.module:callable" returning an nn.Module
    # A dict passed on to the builder (`arch.kwargs={width_mult:0.5}`); num_classes comes from the data set.
    # Typed Any so that a whole dict can be given on the command line (a Dict field is closed to new keys).
    kwargs: Optional[Any] = None
    # The starting weights, one rule for every source (docs/own-model.md, "Weights"):
    # - a file (a path, or a URL downloaded once into paths.cache, hash-checked; a relative path or a URL's file
    #   name is looked up in paths.weights first): this project's own model.pt (any compressed structure, its
    #   architecture must be this one), or a state dict: the tensors at the top level, or under "state_dict",
    #   or under "model" (the first of these that holds them); a "module." prefix on the keys (DataParallel) is
    #   dropped; the keys and shapes must match the model (a mismatch names the file and a few keys);
    # - "random": the builder's initial weights;
    # - null: pretrained here with the `pretrain` schedule and cached (paths.cache/pretrained);
    # - "torchvision": torchvision's ImageNet weights for the papers' *_imagenet archs (downloaded when online).
    #   For source torchvision / timm / module hub weights are refused (no downloads at run time): save them
    #   where you have a network (torch.save(model.state_dict(), "w.pth")) and pass the file.
    checkpoint: Optional[str] = None
    # Input normalisation these weights expect (on [0, 1] RGB); null: computed from the training split's
    # images (per channel, logged). The presets give their weights' values.
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None

    @property
    def spec(self):
        """The builder spec (compress.models.Spec) this config names; model.pt stores it."""
        from compress import models

        return models.Spec(self.source, None if self.source == "module" else self.name, self.target,
                           dict(self.kwargs or {}))

    def __post_init__(self) -> None:
        from compress import models

        require_choice(self.source, "arch.source", models.SOURCES)
        if self.name == MISSING and self.source != "module":  # the schema's own default, before a preset fills it
            return
        self._check_builder()
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is None:
                continue
            if len(values) != 3 or not all(is_number(v) for v in values):
                fail(f"arch.{key}", f"must be three finite numbers (R, G, B), got {values!r}")
        if self.std is not None and not all(s > 0 for s in self.std):
            fail("arch.std", f"must be positive, got {self.std!r}")
        if self.checkpoint is not None and not self.checkpoint.strip():
            fail("arch.checkpoint", "is empty (give a path, a URL, torchvision, random or null)")
        if self.source != "compress" and self.checkpoint is not None and self.checkpoint.strip().lower() in HUB_CHECKPOINTS:
            fail("arch.checkpoint", f"'{self.checkpoint}': hub weights cannot be downloaded here; where you have a "
                  "network, save them (torch.save(model.state_dict(), 'w.pth')) and pass arch.checkpoint=/path/to/w.pth")

    def _check_builder(self) -> None:
        from compress import models

        if self.source == "module":
            if self.target is None or self.target == MISSING:
                fail("arch.target", "is missing: arch=module builds your model from arch.target=package.module:callable")
            if not models.is_target(self.target):
                fail("arch.target", f"expected 'package.module:callable' (Python names), got {str(self.target)[:100]!r}")
        elif self.target is not None:
            fail("arch.target", f"is for arch=module only (arch.source is {self.source}); remove it, or use arch=module")
        if self.source == "compress":
            if self.name not in models.names():
                fail("arch.name", f"unknown architecture '{str(self.name)[:100]}' (known: {', '.join(models.names())}; "
                      "any other model: arch=torchvision, arch=timm or arch=module, docs/own-model.md)")
        elif self.source == "torchvision":
            if self.name not in models.torchvision_names():
                raise models.unknown(self.name, models.torchvision_names(), "torchvision classification model")
        elif self.source == "timm":
            known = models.timm_names()
            if self.name not in known:
                raise models.unknown(self.name, known, "timm model")
        require(self.kwargs is None or isinstance(self.kwargs, dict), "arch.kwargs",
                "null or a dict of builder arguments ({width_mult: 0.5})", self.kwargs)
        self.kwargs = dict(self.kwargs or {})
        require(len(self.kwargs) <= MAX_KWARGS, "arch.kwargs", f"at most {MAX_KWARGS} builder arguments", len(self.kwargs))
        for key in self.kwargs:
            if not (isinstance(key, str) and key.isidentifier()):
                fail("arch.kwargs", f"keys must be argument names, got {str(key)[:100]!r}")
        if "num_classes" in self.kwargs:
            fail("arch.kwargs", "num_classes comes from the data set (dataset.num_classes); remove it from arch.kwargs")
        hub = [k for k in models.HUB_KWARGS if k in self.kwargs and self.kwargs[k] not in (None, False)]
        if hub:
            fail("arch.kwargs", f"{hub[0]}: hub weights cannot be downloaded here; pass a local file as "
                  "arch.checkpoint=/path/to/weights.pth instead (docs/own-model.md)")


SCHEDULERS = ("constant", "multistep", "cosine", "onecycle")
ATTACKS = ("fgsm", "pgd")  # measure.attacks (compress/deploy/attacks.py)


@dataclass
class ScheduleConfig:
    """Fine-tuning (and, as `pretrain`, training from scratch) plus the iterative schedule."""

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5.0e-4
    nesterov: bool = True
    batch_size: int = 128
    scheduler: str = "cosine"      # constant | multistep | cosine | onecycle
    milestones: List[int] = field(default_factory=list)   # epochs, for multistep
    gamma: float = 0.1
    warmup_epochs: int = 0         # linear warm-up from lr/10 (not with onecycle, which warms up itself)
    label_smoothing: float = 0.0
    channels_last: bool = True
    amp: bool = True               # bf16 autocast of the training steps: CUDA, and a CPU with native bf16 (AMX / AVX512-BF16)
    compile: bool = False          # torch.compile (inductor) of the training steps, CUDA and CPU (opt-in)
    max_batches: Optional[int] = None   # cap batches per epoch (quick runs)
    # Knowledge distillation in every fine-tune of a run (recovery after prepare, rounds, final), from the
    # model as loaded, before compression (eval mode): loss = (1 - distill) * CE + distill * T^2 * KL(T),
    # plus feature_weight * MSE between the outputs of the modules named in distill_features (student and
    # teacher shapes must match, e.g. FGFP's stage outputs). 0 and no features = off (no teacher is built).
    distill: float = 0.0
    temperature: float = 4.0
    distill_features: List[str] = field(default_factory=list)
    feature_weight: float = 1.0
    # Iterative schedule: rounds of (method step, fine-tune round_epochs, validate); 0 = one-shot.
    rounds: int = 0
    round_epochs: int = 1
    prepare_epochs: int = 0        # fine-tune after the method's `prepare` (e.g. FGF conversion), before round 1 (row round_0)
    min_top1: Optional[float] = None   # roll a round back when validation top-1 falls below this (absolute, %)
    max_drop: Optional[float] = None   # ... or more than this many points below the baseline's validation top-1
    on_rollback: str = "stop"      # stop | shrink (retry with step_scale * shrink_factor)
    shrink_factor: float = 0.5
    max_rollbacks: int = 3

    @property
    def distilling(self) -> bool:
        """Whether a fine-tune with this schedule needs the teacher."""
        return self.distill > 0 or bool(self.distill_features)

    def check(self, group: str) -> None:
        k = lambda name: f"{group}.{name}"  # noqa: E731
        int_in(k("epochs"), self.epochs, 0, 100_000)
        number_in(k("lr"), self.lr, 0, 1e3, low_open=True)
        number_in(k("momentum"), self.momentum, 0, 1, high_open=True)
        number_in(k("weight_decay"), self.weight_decay, 0, 1)
        int_in(k("batch_size"), self.batch_size, 1, 65_536)
        require_choice(self.scheduler, k("scheduler"), SCHEDULERS)
        for m in self.milestones:
            int_in(k("milestones"), m, 0, 100_000)
        number_in(k("gamma"), self.gamma, 0, 1, low_open=True)
        int_in(k("warmup_epochs"), self.warmup_epochs, 0, 100_000)
        number_in(k("label_smoothing"), self.label_smoothing, 0, 1, high_open=True)
        int_in(k("max_batches"), self.max_batches, 1, allow_none=True)
        number_in(k("distill"), self.distill, 0, 1)
        number_in(k("temperature"), self.temperature, 0, 1000, low_open=True)
        require(len(self.distill_features) <= 1000, k("distill_features"), "at most 1000 module names",
                f"{len(self.distill_features)} of them")
        for name in self.distill_features:
            require(isinstance(name, str) and 0 < len(name) <= 1000 and name.isprintable(), k("distill_features"),
                    "module names (as in model.named_modules())", name)
        number_in(k("feature_weight"), self.feature_weight, 0, 1e6)
        int_in(k("rounds"), self.rounds, 0, 10_000)
        int_in(k("round_epochs"), self.round_epochs, 0, 100_000)
        int_in(k("prepare_epochs"), self.prepare_epochs, 0, 100_000)
        number_in(k("min_top1"), self.min_top1, 0, 100, allow_none=True)
        number_in(k("max_drop"), self.max_drop, 0, 100, allow_none=True)
        require_choice(self.on_rollback, k("on_rollback"), ("stop", "shrink"))
        number_in(k("shrink_factor"), self.shrink_factor, 0, 1, low_open=True, high_open=True)
        int_in(k("max_rollbacks"), self.max_rollbacks, 0, 10_000)


@dataclass
class MeasureConfig:
    latency: bool = True           # CPU latency at batch 1 and 64 (torch.utils.benchmark)
    latency_repeats: int = 7       # median of this many timed repeats (after warm-up)
    # Also export the model and the baseline to ONNX and time them with ONNX Runtime at batch 1
    # (ort_latency_ms_b1, ort_speedup_b1); needs the onnx and onnxruntime packages (installed by `make install`).
    ort_latency: bool = True
    eval_batch_size: int = 500     # also the attacks' batch size (they back-propagate: more memory per image)
    # Adversarial robustness of the final model (compress/deploy/attacks.py): one final-row column per (attack,
    # epsilon), robust_top1_<attack>_eps<eps>. Epsilons are L-inf radii on the [0, 1] pixel scale, before
    # normalisation; the default list is CFDP's Table 8 (which prints no PGD steps or step size).
    attacks: List[str] = field(default_factory=list)   # fgsm | pgd; empty: no attack
    epsilons: List[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
    pgd_steps: int = 10
    pgd_step_size: Optional[float] = None   # null: 2.5 * eps / pgd_steps
    pgd_random_start: bool = True  # start from a uniform point of the eps-ball (seeded by `seed`)
    attack_images: Optional[int] = None     # attack the first N test images; null: all (costly on a CPU)
    # The final model as a static int8 ONNX file (compress/deploy/int8.py, as `compress export --int8` makes it) on the
    # final row: int8_top1 (and the float export's int8_float_top1 on the same test images), int8_speedup_b1 /
    # _b64 over the float export in ONNX Runtime (timed interleaved, `threads`), int8_cpu. Needs onnxruntime.
    int8: bool = False
    int8_calibration: int = 512     # training images that calibrate the activation ranges (a fixed draw)
    int8_test_images: int = 2000    # test images of int8_top1 (a fixed draw; fewer when the test set is smaller)

    def __post_init__(self) -> None:
        int_in("measure.latency_repeats", self.latency_repeats, 1, 10_000)
        if self.latency and self.ort_latency:
            import importlib.util

            missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
            if missing:
                fail("measure.ort_latency", f"needs {' and '.join(missing)}, not installed: `make install`, "
                      "or measure.ort_latency=false")
        int_in("measure.eval_batch_size", self.eval_batch_size, 1, 65_536)
        int_in("measure.int8_calibration", self.int8_calibration, 1, 100_000)
        int_in("measure.int8_test_images", self.int8_test_images, 1, MAX_COUNT)
        if self.int8:
            import importlib.util

            missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
            if missing:
                fail("measure.int8", f"needs {' and '.join(missing)}, not installed: `make install`, or measure.int8=false")
        for attack in self.attacks:
            require_choice(attack, "measure.attacks", ATTACKS)
        twice = [a for i, a in enumerate(self.attacks) if a in self.attacks[:i]]
        if twice:
            fail("measure.attacks", f"lists {twice[0]} twice")
        require(len(self.epsilons) <= 100, "measure.epsilons", "a list of at most 100 numbers",
                f"{len(self.epsilons)} of them")
        for eps in self.epsilons:
            number_in("measure.epsilons", eps, 0, 1)
        # equal values give equal column names (compress.deploy.attacks.column writes the float's repr)
        twice = [eps for i, eps in enumerate(self.epsilons) if float(eps) + 0.0 in [float(e) + 0.0 for e in self.epsilons[:i]]]
        if twice:
            fail("measure.epsilons", f"lists {twice[0]!r} twice")
        if self.attacks and not self.epsilons:
            fail("measure.epsilons", "is empty; list at least one epsilon for measure.attacks")
        int_in("measure.pgd_steps", self.pgd_steps, 1, 1000)
        number_in("measure.pgd_step_size", self.pgd_step_size, 0, 1, low_open=True, allow_none=True)
        int_in("measure.attack_images", self.attack_images, 1, allow_none=True)


@dataclass
class PathsConfig:
    """Where to look for data and weights when a config names none (or only a URL's file name)."""

    data: List[str] = field(default_factory=lambda: ["${oc.env:COMPRESS_DATA,data}", "../shared"])
    weights: List[str] = field(default_factory=lambda: ["${oc.env:COMPRESS_WEIGHTS,weights}", "../shared/pretrained"])
    cache: str = "${oc.env:COMPRESS_CACHE,'~/.cache/compress'}"


@dataclass
class LimitsConfig:
    """Caps for quick runs, applied to `schedule` and `pretrain` and to calibration (null: no cap).
    The `debug=smoke` preset sets them."""

    epochs: Optional[int] = None       # caps epochs, prepare_epochs and round_epochs
    rounds: Optional[int] = None
    batches: Optional[int] = None      # batches per epoch
    batch_size: Optional[int] = None   # training and calibration batch size
    calibration_batches: Optional[int] = None
    quick: bool = False                # methods cut their own optimisation budgets (kernel fits, autoencoders)

    def __post_init__(self) -> None:
        for key in ("epochs", "rounds", "batches", "batch_size", "calibration_batches"):
            int_in(f"limits.{key}", getattr(self, key), 0 if key in ("epochs", "rounds") else 1, allow_none=True)

    def cap(self, value: int, limit: Optional[int]) -> int:
        return value if limit is None else min(value, limit)

    def schedule(self, s: ScheduleConfig) -> ScheduleConfig:
        """`s` with these caps applied."""
        cap_batches = s.max_batches if self.batches is None else self.cap(s.max_batches or self.batches, self.batches)
        return dataclasses.replace(
            s, epochs=self.cap(s.epochs, self.epochs), prepare_epochs=self.cap(s.prepare_epochs, self.epochs),
            round_epochs=self.cap(s.round_epochs, self.epochs), rounds=self.cap(s.rounds, self.rounds),
            batch_size=self.cap(s.batch_size, self.batch_size), max_batches=cap_batches,
            compile=s.compile and not self.quick)


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    method: Any = MISSING          # the chosen method's Options dataclass (compress.methods)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    pretrain: ScheduleConfig = field(default_factory=ScheduleConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    resume: bool = False           # continue the run in hydra.run.dir from its last finished epoch / stage
    threads: Optional[int] = None  # torch intra-op threads (null: torch's default)
    run_id: str = "${now:%Y%m%d-%H%M%S}"
    # The published row this run reproduces: an id of configs/tables/published.csv (compress.report.papers); experiment
    # configs set it, metrics.csv carries it (column paper_row), `compress compare` puts the paper's numbers beside.
    paper_row: Optional[str] = None

    def __post_init__(self) -> None:
        int_in("seed", self.seed, 0, MAX_SEED)
        require_choice(self.device, "device", ("auto", "cpu", "cuda"))
        int_in("threads", self.threads, 1, MAX_THREADS, allow_none=True)
        if self.paper_row is not None:
            from compress.report import papers

            papers.check(self.paper_row, "paper_row")
            if dataclasses.is_dataclass(self.arch) and self.arch.source != "compress":
                fail("paper_row", f"{self.paper_row} is a published row of the papers' {papers.row(self.paper_row)['arch']}, "
                      f"not of arch.source={self.arch.source} models; remove paper_row")
        if not self.paths.cache.strip():
            fail("paths.cache", "is empty")
        if dataclasses.is_dataclass(self.schedule):
            self.schedule.check("schedule")
            self.pretrain.check("pretrain")
            if self.pretrain.distilling:
                fail("pretrain.distill" if self.pretrain.distill else "pretrain.distill_features",
                      "pretraining from scratch has no teacher; distil in `schedule` (the fine-tunes)")
            self.schedule = self.limits.schedule(self.schedule)
            self.pretrain = self.limits.schedule(self.pretrain)


def to_config(cfg) -> Config:
    """The composed DictConfig as typed dataclasses, with every range checked (CompressError)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if unknown := unknown_key(cfg):  # added with +key=... but in no schema: to_object would drop it silently
        raise CompressError(unknown)
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        cause = e.__cause__ if isinstance(e.__cause__, CompressError) else None
        if cause is not None:
            raise cause from None
        key = getattr(e, "full_key", None)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CompressError(f"{key}: {first}" if key else first) from None
    if not dataclasses.is_dataclass(config.method):
        raise CompressError("method: choose a method group option (method=<name>)")
    return config

