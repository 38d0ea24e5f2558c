"""The job's typed configuration: Hydra composes YAML from `conf/`, this module
turns it into typed dataclasses once, at the entry point (as in lingua)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.config import DataConfig, ObjectiveConfig
from data_pipeline.storage import is_remote
from trainers.config import ChaosConfig, DeepSpeedConfig, TrainerConfig
from trainers.decoding import DecodingConfig
from trainers.engines import check_engine_keys
from trainers.export_ct2 import COMPUTE_TYPES
from trainers.models import ModelConfig

from .conf_dir import CONF_DIR
from .evaluation.config import EvalConfig
from .pipeline.config import PipelineConfig
from .serve.config import ServeConfig
from .sweep.config import SweepConfig
from .tracking import TrackingConfig


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


REMOTE_RUN_DIR_COMMANDS = "prepare, pretrain, finetune, sweep, pipeline, export and evaluate"


def require_local(key: str, value: str, command: str) -> None:
    """Refuse an object-storage URL for a folder that `command` can only use on a (shared) file system."""
    if value and is_remote(value):
        raise ConfigError(f"{key}: {command} needs a local or shared folder, not {value} (object-storage URLs "
                          f"work with {REMOTE_RUN_DIR_COMMANDS})")


@dataclass
class RunConfig:
    dir: str = "runs/${now:%Y%m%d-%H%M%S}"
    """Run folder: config.yaml, metrics, checkpoints and outputs of this job go here."""
    seed: int = 0
    """The job's seed: `trainer.seed` (initial weights, data order, dropout), `sweep.seed` (the trials sampled)
    and `decoding.seed` (sampling) follow it unless set themselves (conf/config.yaml)."""


@dataclass
class ClusterConfig:
    address: str = ""
    """Ray cluster to join (`auto`, `ray://head:10001`, `127.0.0.1:6379`); empty = start a local one."""
    num_cpus: int = 0
    """CPUs of the local cluster started when `address` is empty; 0 = all of this machine's."""
    storage_path: str = ""
    """Shared storage for checkpoints on a multi-node cluster; empty = `run.dir` (one machine)."""
    allow_insecure: bool = False
    """`submit`: send the Ray token over plain HTTP to a non-loopback address (anyone on the path can read it);
    also `--allow-insecure` or SEQFOUNDRY_ALLOW_INSECURE=1."""

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ValueError(f"cluster.num_cpus: must be >= 0, got {self.num_cpus}")


RUNS_ACTIONS = ("list", "compare")


@dataclass
class RunsConfig:
    """`seqfoundry runs list|compare`: a table of run folders, or runs side by side."""

    action: str = "list"
    """`list` (one row per run folder under `runs.root`) or `compare` (the runs in `runs.dirs`); the first
    word after `seqfoundry runs` sets it."""
    root: str = "runs"
    """Folder (or object-storage URL) whose sub-folders are listed by `runs list`."""
    dirs: list[str] = field(default_factory=list)
    """Run folders (paths or URLs) for `runs compare` and for `report run=a,b` overlays."""

    def __post_init__(self) -> None:
        if self.action not in RUNS_ACTIONS:
            raise ValueError(f"runs.action: must be list or compare, got {self.action!r}")
        if not self.root:
            raise ValueError("runs.root: empty; name a folder or a bucket URL")


@dataclass
class ExportConfig:
    format: str = "package"
    """`package` (a checkpoint of run.dir -> a seqfoundry model package), `hf` (a folder that
    `transformers.AutoModelForSeq2SeqLM.from_pretrained` loads) or `ctranslate2` (a CTranslate2 model)."""
    package: str = ""
    """hf/ctranslate2: the model package to convert; empty = the run's package (<run.dir>/model, or the
    checkpoint `tag` consolidated first)."""
    tag: str = ""
    """Checkpoint to export (`step_00000100`, a folder under <run.dir>/checkpoints); empty = the latest."""
    out: str = ""
    """Folder to write; empty = <run.dir>/model (package), <package>-hf or <package>-ctranslate2."""
    average_last: int = 1
    """package: average the weights of the last N checkpoints (up to `tag`) into the package; 1 = no averaging."""
    quantization: str = ""
    """ctranslate2: weight type stored in the model (`int8`, `int8_float32`, `bfloat16`); empty = float32."""

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"export.format: must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        if self.average_last < 1:
            raise ValueError(f"export.average_last: must be >= 1, got {self.average_last}")
        if self.quantization and self.format != "ctranslate2":
            raise ValueError("export.quantization: only export.format=ctranslate2 stores quantized weights")
        if self.quantization not in ("", *COMPUTE_TYPES):
            raise ValueError(f"export.quantization: must be one of {', '.join(COMPUTE_TYPES)} or empty, "
                             f"got {self.quantization!r}")
        if self.package and self.format == "package":
            raise ValueError("export.package: is what export.format=hf or ctranslate2 converts; "
                             "export.format=package exports a checkpoint of run.dir")


@dataclass
class DemoConfig:
    task: str = "reverse"
    """Toy task for `seqfoundry demo`: `copy` or `reverse` a random token sequence."""
    steps: int = 400
    """Optimizer steps of the single-process toy training."""
    batch_size: int = 64
    """Sequences per batch."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up over 10% of the steps, then linear decay to 10% of it)."""
    min_len: int = 3
    """Shortest toy sequence (tokens, eos excluded)."""
    max_len: int = 8
    """Longest toy sequence (tokens, eos excluded)."""
    num_eval: int = 64
    """Held-out sequences decoded with each strategy at the end."""

    def __post_init__(self) -> None:
        if self.task not in ("copy", "reverse"):
            raise ValueError(f"demo.task: must be 'copy' or 'reverse', got {self.task!r}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"demo.min_len/max_len: need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        for key in ("steps", "batch_size", "num_eval"):
            if getattr(self, key) < 1:
                raise ValueError(f"demo.{key}: must be >= 1, got {getattr(self, key)}")


EXPORT_FORMATS = ("package", "hf", "ctranslate2")
GENERATE_FORMATS = ("text", "jsonl")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class GenerateConfig:
    package: str = ""
    """Model package to generate with (`seqfoundry generate package=runs/p1/model`)."""
    input: str = ""
    """File of source lines; empty or `-` = standard input."""
    output: str = ""
    """File to write; empty or `-` = standard output."""
    format: str = "text"
    """`text`: the best output per line; `jsonl`: every hypothesis with its tokens and scores."""
    batch_size: int = 32
    """Source lines decoded together (the outputs do not depend on it)."""
    device: str = "auto"
    """`auto` (a GPU when there is one), `cpu` or `cuda`."""
    engine: str = "torch"
    """`torch` (our decoder) or `ctranslate2` (the package converted once, cached beside it; Transformers only)."""
    compute_type: str = "float32"
    """`float32`; with engine=ctranslate2 also `int8`, `int8_float32`, `bfloat16` (where the device has it)."""

    def __post_init__(self) -> None:
        check_engine_keys(self.engine, self.compute_type, key="generate")
        if self.format not in GENERATE_FORMATS:
            raise ValueError(f"generate.format: must be text or jsonl, got {self.format!r}")
        if self.batch_size < 1:
            raise ValueError(f"generate.batch_size: must be >= 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise ValueError(f"generate.device: must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class JobConfig:
    """Every slice a seqfoundry job may use; each command hands each component its slice."""

    model: ModelConfig = field(default_factory=ModelConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    runs: RunsConfig = field(default_factory=RunsConfig)
    resume: bool = False
    """Continue the run in `run.dir` from its last checkpoint (after the driver died)."""
    pretrained: str = ""
    """Model package to fine-tune from (`seqfoundry finetune pretrained=<run>/model`)."""


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, checked against JobConfig."""
    ConfigStore.instance().store(name="job_schema", node=JobConfig)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(one_line(err)) from err


def load_job_config(path: str | Path) -> JobConfig:
    """A run folder's saved config.yaml as a typed JobConfig.

    A saved config is resolved when it is written, so it holds no `${...}`: one that does (a crafted
    `${oc.env:SECRET}` in someone else's package) is refused unresolved, naming the key."""
    try:
        saved = OmegaConf.load(path)
        refuse_interpolations(path, OmegaConf.to_container(saved, resolve=False))
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), saved)
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{path}: {one_line(err)}") from err
    return to_typed(merged)


def refuse_interpolations(path: str | Path, node: Any, key: str = "") -> None:
    """ConfigError naming the first key of a saved config whose value holds `${` (never resolved)."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for name, value in children:
        refuse_interpolations(path, value, f"{key}.{name}" if key else str(name))
    if isinstance(node, str) and "${" in node:
        raise ConfigError(f"{key}: {path} holds an interpolation; a saved config is loaded without resolving "
                          "any (is it a seqfoundry run's config.yaml?)")


def to_typed(cfg: DictConfig) -> JobConfig:
    """Resolve interpolations and build the typed objects (runs __post_init__ checks)."""
    try:
        return OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(one_line(err)) from err


def one_line(err: BaseException) -> str:
    """Squeeze a Hydra/OmegaConf/ValueError message into one line naming the key."""
    cause = err.__cause__ or err.__context__
    if isinstance(cause, OmegaConfBaseException) and not isinstance(err, OmegaConfBaseException):
        return one_line(cause)
    if isinstance(err, OmegaConfBaseException):
        full_key = getattr(err, "full_key", None)
        msg = str(getattr(err, "msg", None) or err).splitlines()[0]
        return f"{full_key}: {msg}" if full_key else msg
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text.split(" Config search path:")[0]
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown:
        return f"{unknown.group(1)}: no such config key"
    return text


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (for --help)."""
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def describe_keys(cls: type = JobConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every leaf field below `cls`, for --help output."""
    rows: list[tuple[str, Any, str]] = []
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_keys(type(value), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", value, docs.get(f.name, "")))
    return rows
