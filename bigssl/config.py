"""The run's configuration: one typed dataclass per section, YAML recipes, dotted overrides.

`load(recipe, overrides, registry=...)` returns a `Config` whose every field has been
type-checked; an unknown key, a wrong type or a value outside its choices raises `ConfigError`
naming the key. The `method` section's schema belongs to the method chosen by `method.name`, so
a SimCLR recipe cannot carry a stray DINO key unnoticed.

This module is the ground floor (docs/architecture.md): it imports nothing of bigssl but
errors.py and config_ranges.py. What it cannot know without importing the floors above (which
methods exist and their schemas, which view policies exist and their settings) it is told: the
caller passes a `Registry` in. `bigssl.recipes.load` is the caller that fills one with every
registered method and view policy.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bigssl.config_ranges import check_values
from bigssl.errors import ConfigError


@dataclass
class ViewsConfig:
    """How images become views. Every field left null takes the policy's published value
    (bigssl/methods/policies.py); `--print-config` shows what each resolved to. The last four
    say what the views are, so that the data pipeline reads them instead of a policy's name."""

    policy: str = "simclr"  # instdisc | mocov2 | simclr | byol | swav | dino | cmc | cpc | clip
    size: int | None = None  # side of the global crops
    views: int | None = None  # global crops per image
    crop_scale: list[float] | None = None  # area fraction of a global crop
    crop_ratio: list[float] | None = None
    interpolation: str | None = None  # bilinear | bicubic
    local_crops: int | None = None  # multi-crop: small crops per image (SwAV, DINO)
    local_size: int | None = None
    local_crop_scale: list[float] | None = None
    flip_prob: float | None = None
    jitter: list[float] | None = None  # brightness, contrast, saturation, hue
    jitter_prob: float | None = None
    grayscale_prob: float | None = None
    grayscale_first: bool | None = None  # InstDisc / MoCo v1 order
    blur_prob: list[float] | None = None  # one per global view; the last repeats
    local_blur_prob: float | None = None
    blur_sigma: list[float] | None = None
    solarize_prob: list[float] | None = None  # one per global view; the last repeats
    local_solarize_prob: float | None = None
    mean: list[float] | None = None  # [] = feed [0, 1] pixels
    std: list[float] | None = None
    resize: int | None = None  # short side before a crop (evaluation, CPC, CLIP)
    grid: int | None = None  # CPC: patches per side
    patch: int | None = None  # CPC: patch side (stride patch / 2)
    patch_jitter: int | None = None  # CPC: patch content is a random (patch − jitter) px sub-crop
    # random_resized: `views` global (+ `local_crops` local) random-resized crops | random_square: the
    # short side resized to `resize`, one random `size` square (CLIP) | patch_grid: that square,
    # flipped at random, cut into grid × grid patches (CPC)
    crop: str | None = None
    color_space: str | None = None  # of the global crops: rgb | lab (CIE Lab, each channel scaled to [-1, 1])
    channel_split: list[int] | None = None  # [] = one view per crop; [1, 2]: each global crop's L and ab as two views
    text: bool | None = None  # the batch carries each sample's caption (.txt): image–text methods


@dataclass
class DataConfig:
    # Brace patterns of tar shards (several joined by '::' are mixed by `weights`), pipe:
    # commands, or quickstart:<split>.
    train: str = "quickstart:train"
    val: str = "quickstart:val"  # labelled held-out shards for kNN ('' = none)
    mode: str = "resampled"  # resampled: shards drawn with replacement; exact: each sample once per epoch
    samples_per_epoch: int = 0  # 0 = number of samples in data.train (from its index.json)
    weights: list[float] = field(default_factory=list)  # per '::' source, resampled mode; [] = equal
    workers: int = 2  # DataLoader worker processes per rank
    interleave: int = 4  # shards each worker reads at once
    shuffle_buffer: int = 2000  # samples, per worker
    micro_batch: int = 0  # samples a worker hands over at a time; 0 = the per-rank batch (no re-batching copy)
    fast_decode: bool = True  # libjpeg-turbo's fast IDCT and upsampling for training images (not evaluation)
    require_labels: bool = False  # skip (and count) samples without a .cls member
    timeout_s: float = 300.0  # fail when no sample arrives for this long (0 = wait forever)
    views: ViewsConfig = field(default_factory=ViewsConfig)


@dataclass
class ProjectorConfig:
    hidden_dim: int = 2048
    out_dim: int = 128
    layers: int = 2  # linear layers; SimCLR v1 uses 2, v2 uses 3
    batch_norm: bool = True  # BN after every layer, as in SimCLR's official code
    last_batch_norm: bool | None = None  # BN on the output too; None = as batch_norm (BYOL: false)
    last_affine: bool = True  # the output BN's scale and shift (SimSiam, MoCo v3: false)


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # any timm model name; built with pretrained=False
    backbone_args: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    small_stem: bool = False  # ResNets: 3×3 first conv and no max-pool, for 28–64 px inputs
    small_stem_stride: int = 1
    # CNNs: average-pool the last feature map to g×g cells and concatenate them (g² × the
    # channels) instead of one global average; 1 = timm's global average pool. Small images keep
    # where things are: on 28 px Fashion-MNIST the 2×2 grid is what lets SimCLR beat raw pixels.
    pool_grid: int = 1
    channels_last: bool = True
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


@dataclass
class MethodConfig:
    """Base of every method's own section; subclasses live beside their method. `ranges`: the
    allowed range of fields config_ranges.METHOD_RANGES does not cover (a one-file method's own)."""

    ranges: ClassVar[Mapping[str, Any]] = {}
    name: str = "simclr"


@dataclass
class OptimConfig:
    name: str = "lars"  # lars | sgd | adamw
    batch_size: int = 4096  # global, over all ranks
    epochs: int = 100
    max_steps: int = 0  # cap for smoke runs; 0 = none
    base_lr: float = 0.3
    lr_scaling: str = "linear"  # linear: base_lr × batch/256; sqrt: base_lr × √batch; none
    lr: float = 0.0  # 0 = derived from base_lr by lr_scaling (the resolved value is recorded)
    min_lr: float = 0.0  # end of the cosine
    # > 0: min_lr is this fraction of the resolved lr, so it scales with the batch as the lr does
    # (Barlow Twins' 0.001 × peak); it overrides min_lr, whose resolved value is recorded.
    min_lr_fraction: float = 0.0
    lr_schedule: str = "cosine"  # cosine | step (after the warm-up)
    lr_milestones: list[float] = field(default_factory=list)  # step: epochs where the lr drops
    lr_factors: list[float] = field(default_factory=list)  # step: lr/peak from each milestone on; [] = 0.1, 0.01, …
    # true: the lr is set once per epoch, to the schedule's value at the epoch's first step (MoCo v2
    # and SimSiam's official cosine); false: every step.
    lr_per_epoch: bool = False
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 0.0  # the lr at the warm-up's first step (SwAV: 0.3)
    # True: the warm-up's last step is at the peak, as np.linspace(start, peak, n) gives (official
    # DINO and SwAV); False: the peak comes at the first step after it (MoCo v3, BYOL, SimCLR).
    warmup_includes_peak: bool = False
    weight_decay: float = 1e-6
    exclude_bias_norm: bool = True  # no weight decay and no LARS adaptation on biases and norms
    no_decay_lr_scale: float = 1.0  # lr of biases and norms relative to the weights' (Barlow Twins: 0.024)
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lars_eta: float = 0.001
    # lars: trust η‖w‖/‖g + wd·w‖ (BYOL, Barlow Twins, MoCo v3); larc: η‖w‖/(‖g‖ + wd‖w‖ + ε),
    # NVIDIA apex's LARC with clip off, as the official SwAV uses it.
    lars_rule: str = "lars"
    clip_grad: float = 0.0  # max global gradient norm; 0 = off
    clip_grad_per_parameter: bool = False  # clip each parameter's gradient norm alone (DINO's official clipping)
    # A step whose loss is not finite (on any rank) is skipped and logged; this many in a row
    # stop the run, its last checkpoint kept.
    nonfinite_limit: int = 10


@dataclass
class EngineConfig:
    kind: str = "ddp"  # ddp | fsdp (FSDP2) | deepspeed
    zero_stage: int = 2  # deepspeed: 1 optimizer state, 2 + gradients, 3 + parameters sharded
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling; GPU only)
    backend: str = "auto"  # auto = nccl with GPUs, gloo without
    sync_bn: bool = False
    timeout_s: float = 1800.0  # collectives (NCCL waits this long for a dead peer)
    # A rank whose heartbeat stops this long is reported by rank and host, and the others exit
    # (0 = off). Generous: a rank holding Python's lock in a long save must not look dead.
    dead_rank_timeout_s: float = 120.0
    activation_checkpointing: bool = False  # recompute the backbone's blocks in backward (timm models)
    compile: bool = False  # torch.compile the backbone (ddp and fsdp engines)
    loss_scale_init: float = 65536.0  # fp16: the first dynamic loss scale, a power of two


@dataclass
class LogConfig:
    dir: str = ""  # '' = runs/<name>
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0 = only at the end of each epoch
    keep: int = 2
    resume: bool = True  # resume from the newest checkpoint in log.dir when there is one
    # After the checkpoint that USR1 (the time-limit warning) triggers, under SLURM: requeue the
    # job (`scontrol requeue $SLURM_JOB_ID`) so that it resumes by itself. SIGTERM (scancel,
    # preemption) checkpoints and exits without requeueing.
    requeue: bool = True


@dataclass
class EvalConfig:
    knn_at_end: bool = True
    knn_every_epochs: int = 0  # 0 = never during training
    knn_baseline: bool = True  # also score the backbone at its random initialisation
    knn_pixels: bool = False  # also score raw pixels (a floor every method should beat)
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 256  # per rank, for feature extraction
    online_probe_classes: int = 0  # > 0: train a linear classifier on detached features alongside
    projector_samples: int = 512  # validation embeddings dumped for TensorBoard's projector at the end
    online_probe_lr: float = 0.1  # its peak lr (same schedule as the backbone's; no weight decay)


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.mode": ("resampled", "exact"),
    "optim.name": ("lars", "sgd", "adamw"),
    "optim.lr_scaling": ("linear", "sqrt", "none"),
    "optim.lars_rule": ("lars", "larc"),
    "engine.kind": ("ddp", "fsdp", "deepspeed"),
    "engine.zero_stage": (1, 2, 3),
    "engine.precision": ("fp32", "bf16", "fp16"),
    "engine.backend": ("auto", "gloo", "nccl"),
    "optim.lr_schedule": ("cosine", "step"),
}
# What a view policy's crops are (data.views.crop) and their colours (data.views.color_space):
# checked once the policy has filled them in.
VIEW_CROPS = ("random_resized", "random_square", "patch_grid")
COLOR_SPACES = ("rgb", "lab")


@dataclass(frozen=True)
class MethodSchema:
    """What parsing needs of one method: its section's dataclass, the allowed values of its text
    fields, and whether config_ranges.METHOD_RANGES applies to its numbers (the built-ins'; a
    plug-in's field names may mean other things, so its numbers are only checked for being finite)."""

    config_class: type[MethodConfig]
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    builtin_ranges: bool = False


@dataclass(frozen=True)
class Registry:
    """What parsing learns by registration instead of by import: the schema of every method by
    `method.name`, and every view policy's settings by `data.views.policy` (each `data.views`
    field it fills, and the `*_fraction` entries the derived sizes come from)."""

    methods: Mapping[str, MethodSchema]
    policies: Mapping[str, Mapping[str, Any]]

    def method(self, name: str) -> MethodSchema:
        if name not in self.methods:
            raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(sorted(self.methods))}")
        return self.methods[name]

    def policy(self, name: str) -> Mapping[str, Any]:
        if name not in self.policies:
            raise ConfigError(f"data.views.policy: unknown policy {name!r}; known: {', '.join(sorted(self.policies))}")
        return self.policies[name]


def _one_line(err: OmegaConfBaseException) -> str:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {message}" if key else message


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------ recipe files
class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (YAML keeps the
    last one silently, so a recipe edited in two places would train the other value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` overrides are YAML's own way of repeating keys
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float)):
                continue  # unhashable or odd keys: SafeLoader's own error, or the schema's
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first[key].start_mark.line + 1})",
                    key_node.start_mark)
            first[key] = key_node
        return super().construct_mapping(node, deep)


# Dates stay text: `name: 2024-05-01` is a run name, and OmegaConf holds no datetime.
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _yaml_error(path: Path, text: str, err: yaml.YAMLError) -> ConfigError:
    """One line that keeps where the parser stopped: `recipe.yaml:3:7: not valid YAML: ...`."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None:
        return ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}")
    position = getattr(err, "position", None)  # a ReaderError (a character YAML does not allow) has no mark
    if position is None:
        return ConfigError(f"{path}: not valid YAML: {problem}")
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return ConfigError(f"{path}:{line}:{column}: not valid YAML: {problem}")


def _recipe_text(path: Path) -> str:
    if path.is_dir():
        raise ConfigError(f"recipe {path} is a directory; give a recipe YAML file", per_node=True)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}", per_node=True)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"recipe {path}: cannot be read ({err.strerror or err})", per_node=True) from err
    try:
        return data.decode("utf-8-sig")  # a byte-order mark some editors write is fine
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "save the recipe as UTF-8") from err


def _read_yaml(path: Path) -> dict[str, Any]:
    text = _recipe_text(path)
    try:
        content = yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: no tags that build objects
    except yaml.YAMLError as err:
        raise _yaml_error(path, text, err) from err
    except RecursionError as err:  # nesting deep enough to exhaust Python's stack
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from err
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(content).__name__}")
    return content


# -------------------------------------------------------------------------------- overrides
_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*")


def _parse_override(item: str) -> dict[str, Any]:
    """`section.key=value` → the nested dict it sets; the value is read as OmegaConf reads it."""
    key, equals, value = item.partition("=")
    try:
        item.encode("utf-8")
    except UnicodeEncodeError as err:  # argv bytes that are not UTF-8 arrive as lone surrogates
        name = key if equals and _KEY.fullmatch(key) else ascii(item)
        raise ConfigError(f"override {name}: not valid UTF-8 text ({ascii(item[err.start:err.end])})") from err
    if not equals or not key:
        raise ConfigError(f"override {_shown(item)} is not of the form section.key=value")
    if not _KEY.fullmatch(key):
        raise ConfigError(f"override {_shown(item)}: {_shown(key)} is not a dotted key such as optim.batch_size")
    # 'data.val=' means the empty string (OmegaConf would read None, which no field accepts).
    text = item + "''" if not value else item
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([text]))
    except OmegaConfBaseException as err:
        message = _one_line(err)
        raise ConfigError(message if message.startswith(key) else f"override {key}: {message}") from err
    return parsed  # type: ignore[return-value]


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-mapping value in `tree`."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def _parse_overrides(overrides: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Each override as the nested dict it sets, in order, and a note for every key set more than
    once (the last one wins, as on any command line). One override that sets a key inside
    another's value (`a.b=1 a.b.c=2`) is refused: one of them would be dropped silently."""
    parsed: list[dict[str, Any]] = []
    given: dict[str, list[str]] = {}
    for item in overrides:
        tree = _parse_override(item)
        _check_sections(tree, Config(), "")
        for key, value in _leaves(tree):
            for earlier in given:
                if key.startswith(earlier + ".") or earlier.startswith(key + "."):
                    raise ConfigError(f"override {key}: conflicts with the override of {earlier} "
                                      "(one sets a value, the other a key inside it)")
            given.setdefault(key, []).append(_shown(value))
        parsed.append(tree)
    notes = [f"{key} is overridden {len(values)} times ({', '.join(values)}): the last one is used"
             for key, values in given.items() if len(values) > 1]
    return parsed, notes


def override_notes(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """What `--print-config` says about the overrides: each key given more than once."""
    return _parse_overrides(list(overrides))[1]


def _check_sections(raw: dict[Any, Any], schema: Any, prefix: str) -> None:
    """A section (optim, data.views, ...) must be given as a mapping, and a list or dict field as
    a list or mapping: OmegaConf's merge of `optim=3` or `optim.betas={a: 1}` fails with a message
    that names no key (or a TypeError), and a later `optim.max_steps=2` would replace the 3
    silently. An empty section (`optim:` with nothing under it) is read as {}."""
    kinds = {item.name: str(item.type) for item in fields(schema)}
    for key in list(raw):
        if not isinstance(key, str):
            raise ConfigError(f"{prefix}{_shown(key)}: a key must be a name, got {type(key).__name__}")
        value, section = raw[key], getattr(schema, key, None) if key in kinds else None
        if is_dataclass(section):
            if value is None:
                raw[key] = {}
            elif not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key}: is a section; set its keys ({prefix}{key}.KEY=VALUE), "
                                  f"got {_shown(value)}")
            else:
                _check_sections(value, section, f"{prefix}{key}.")
        elif key in kinds and kinds[key].startswith("list") and isinstance(value, dict):
            raise ConfigError(f"{prefix}{key}: expected a list such as [1, 2], got {_shown(value)}")
        elif key in kinds and kinds[key].startswith("dict") and isinstance(value, list):
            raise ConfigError(f"{prefix}{key}: expected a mapping such as {{name: value}}, got {_shown(value)}")


def _merged(base: dict[Any, Any], update: dict[Any, Any]) -> dict[Any, Any]:
    """`update` over `base`: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


@functools.cache
def _base_schema() -> DictConfig:
    """The typed schema of every section, built once (30 ms; a copy takes 5): each load copies it."""
    return OmegaConf.structured(Config)


def _raw(recipe: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    raw = _read_yaml(Path(recipe)) if recipe else {}
    _check_sections(raw, Config(), "")
    for tree in _parse_overrides(overrides)[0]:
        raw = _merged(raw, tree)
    return raw


def load(recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
         registry: Registry) -> Config:
    """Recipe YAML ⊕ `section.key=value` overrides → a validated, resolved `Config`; `registry`
    names the methods and view policies there are (`bigssl.recipes.load` passes every registered one)."""
    raw = _raw(recipe, list(overrides))
    method = raw.get("method", {})
    method_name = method.get("name", MethodConfig.name) if isinstance(method, dict) else MethodConfig.name
    method_entry = registry.method(str(method_name))
    method_schema = method_entry.config_class()
    if isinstance(method, dict):
        _check_sections(method, method_schema, "method.")  # the method's own list fields
    schema = copy.deepcopy(_base_schema())
    try:
        schema.method = method_schema
        if recipe and "name" not in raw:
            schema.name = Path(recipe).stem
        merged = OmegaConf.merge(schema, OmegaConf.create(raw))
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from err
    except TypeError as err:  # OmegaConf's merge of mismatched containers, should a shape slip through
        raise ConfigError(f"a value does not fit its key's type: {err}") from err
    validate(config, method_entry)
    resolve(config, registry)
    check_resolved(config)
    return config


def get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(config: Config, method: MethodSchema) -> None:
    """`method`: the schema `config.method.name` is registered with."""
    # First: the checks below compare numbers, which NaN defeats. The method fields' ranges are
    # those of the built-in methods; a plug-in's fields may mean something else.
    check_values(config, method_ranges=method.builtin_ranges, own_ranges=method.config_class.ranges)
    choices = {**CHOICES, **{f"method.{name}": allowed for name, allowed in method.choices.items()}}
    for key, allowed in choices.items():
        value = get(config, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    pairs = ("data.views.crop_scale", "data.views.crop_ratio", "data.views.local_crop_scale",
             "data.views.blur_sigma")
    for key in pairs:
        pair = get(config, key)
        if pair is not None and (len(pair) != 2 or pair[0] > pair[1]):
            raise ConfigError(f"{key}: expected [low, high] with low <= high, got {list(pair)}")
    if len(config.optim.betas) != 2:  # Adam's two decay rates, in no particular order
        raise ConfigError(f"optim.betas: expected [beta1, beta2], got {config.optim.betas}")
    _check_step_schedule(config.optim)
    scale = config.engine.loss_scale_init
    if scale < 1 or math.log2(scale) != int(math.log2(scale)):
        raise ConfigError(f"engine.loss_scale_init: {scale} is not a power of two >= 1 (scaling by one is exact)")
    if not config.data.train:
        raise ConfigError("data.train: no training shards given")
    if config.data.mode == "exact" and config.data.weights and len(set(config.data.weights)) > 1:
        raise ConfigError(
            "data.weights: mixing weights apply to data.mode=resampled; exact epochs read every sample once")


def _check_step_schedule(optim: OptimConfig) -> None:
    """What optim.lr_schedule=step needs (bigssl/optim.py checks it again, after torch loads)."""
    if optim.lr_schedule != "step":
        return
    milestones = list(optim.lr_milestones)
    if not milestones or milestones != sorted(milestones):
        raise ConfigError(f"optim.lr_milestones: {milestones} must be increasing epochs for lr_schedule: step")
    if optim.lr_factors and len(optim.lr_factors) != len(milestones):
        raise ConfigError(f"optim.lr_factors: {len(optim.lr_factors)} factors for {len(milestones)} "
                          "optim.lr_milestones")


def check_resolved(config: Config) -> None:
    """What only the resolved values tell: the policy's filled-in views, the derived lr, and a
    log.dir that cannot become a directory."""
    check_values(config.data.views, "data.views", method_ranges=False)
    views = config.data.views
    if views.jitter[3] > 0.5:
        raise ConfigError(f"data.views.jitter: the hue (4th value) must be in [0, 0.5], got {views.jitter[3]}")
    if views.patch_jitter >= views.patch:
        raise ConfigError(f"data.views.patch_jitter: must be smaller than data.views.patch ({views.patch}), "
                          f"got {views.patch_jitter}")
    if not math.isfinite(config.optim.lr):
        raise ConfigError(f"optim.base_lr: scaled by the batch ({config.optim.lr_scaling}) it gives lr "
                          f"{config.optim.lr}; lower it")
    _check_log_dir(Path(config.log.dir))


def _check_log_dir(path: Path) -> None:
    """log.dir must be a directory or creatable as one (a file there fails only when the run
    writes, with an OSError that names no key)."""
    for where in (path, *path.parents):
        if not where.exists():
            continue
        if not where.is_dir():
            what = "is a file" if where == path else f"cannot be created: {where} is a file"
            raise ConfigError(f"log.dir: {path} {what}; a run directory is needed", per_node=True)
        return


def _resolve_views(views: ViewsConfig, registry: Registry) -> None:
    table = registry.policy(views.policy)
    for name, value in table.items():
        if hasattr(views, name) and getattr(views, name) is None:
            setattr(views, name, value)
    size = views.size
    derived = {"local_size": table["local_size_fraction"] * size, "resize": table["resize_fraction"] * size,
               "patch": table["patch_fraction"] * size}
    for name, value in derived.items():
        if getattr(views, name) is None:
            setattr(views, name, max(1, round(value)))
    if views.patch_jitter is None:
        views.patch_jitter = max(0, round(table["patch_jitter_fraction"] * views.patch))
    if views.interpolation not in ("bilinear", "bicubic"):
        raise ConfigError(f"data.views.interpolation: {views.interpolation!r} is not bilinear or bicubic")
    _check_view_kind(views)
    if len(views.mean) != len(views.std):
        raise ConfigError("data.views.mean and data.views.std must have the same length")
    if len(views.jitter) != 4:
        raise ConfigError("data.views.jitter: expected [brightness, contrast, saturation, hue]")
    for name in ("size", "views", "resize"):
        if getattr(views, name) <= 0:
            raise ConfigError(f"data.views.{name}: must be positive, got {getattr(views, name)}")


def _check_view_kind(views: ViewsConfig) -> None:
    """What the views are, once the policy has filled it in."""
    for key, allowed in (("crop", VIEW_CROPS), ("color_space", COLOR_SPACES)):
        if getattr(views, key) not in allowed:
            raise ConfigError(f"data.views.{key}: {getattr(views, key)!r} is not one of {', '.join(allowed)}")
    if views.channel_split and sum(views.channel_split) != 3:
        raise ConfigError(f"data.views.channel_split: {views.channel_split} must add up to the 3 channels of a crop "
                          "([] = one view per crop)")


def resolve(config: Config, registry: Registry) -> None:
    """Fill derived values so the recorded config says exactly what ran."""
    _resolve_views(config.data.views, registry)
    optim = config.optim
    if optim.lr <= 0:
        if optim.lr_scaling == "linear":
            optim.lr = optim.base_lr * optim.batch_size / 256
        elif optim.lr_scaling == "sqrt":
            optim.lr = optim.base_lr * math.sqrt(optim.batch_size)
        else:
            optim.lr = optim.base_lr
    if optim.min_lr_fraction > 0:
        optim.min_lr = optim.min_lr_fraction * optim.lr
    if not config.log.dir:
        config.log.dir = str(Path("runs") / config.name)


def per_rank_batch(config: Config, world_size: int) -> int:
    global_batch = config.optim.batch_size
    if global_batch % world_size:
        raise ConfigError(
            f"optim.batch_size={global_batch} is not divisible by the world size {world_size}")
    return global_batch // world_size


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
