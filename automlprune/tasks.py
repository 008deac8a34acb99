"""Task specs: a model, a dataset, a checkpoint and the training / evaluation settings, read
from a YAML file (shipped ones in ``automlprune/envs/``); and the :class:`Task` that loads them."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from automlprune.config_files import check_keys, read_yaml
from automlprune.errors import CheckpointError, ConfigError
from automlprune.settings import EvalSettings, FinetuneSettings, TrainSettings

SHIPPED = Path(__file__).resolve().parent
"""The package folder whose ``envs/`` and ``search_spaces/`` hold the shipped task and space files (package data)."""


def read_settings(cls: type, data: Any, where: str) -> Any:
    """A settings dataclass ``cls`` from a mapping, each value checked against its field's type
    (``where`` names it in errors); absent keys keep the class defaults."""
    data = data or {}
    check_keys(data, [f.name for f in fields(cls)], where)
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        default = getattr(cls(), f.name)
        if default is None and data[f.name] is not None:  # an optional value: coerced as its type
            default = 0.0 if "float" in str(f.type) else "" if "str" in str(f.type) else default
        kwargs[f.name] = _coerce(data[f.name], default, f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a value outside its range (the settings' own check)
        raise ConfigError(f"{where}.{exc}; fix it in the task file or with --set") from None


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check ``value`` has the type of ``default`` (tuples from lists, floats from ints)."""
    if isinstance(default, tuple):
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif isinstance(default, int) or (default is None and value is not None):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, str):  # PyYAML reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class TaskSpec:
    """A task as written in ``envs/NAME.yaml`` (see the shipped files for every key)."""

    name: str
    model: str
    model_kwargs: dict[str, Any]
    dataset: str
    dataset_options: dict[str, Any]
    checkpoint: Path
    auto_train: bool = False
    space: str = "default"
    train: TrainSettings = field(default_factory=TrainSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    strategies: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Default options per strategy name (``--option`` overrides them), e.g. DMCP's epochs."""
    description: str = ""
    source: Path | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | None = None) -> "TaskSpec":
        where = f"task '{source}'" if source else "task"
        check_keys(data, {"name", "description", "model", "dataset", "checkpoint", "auto_train", "space", "train",
                          "evaluation", "finetune", "strategies"}, where)
        strategies = data.get("strategies") or {}
        if not isinstance(strategies, dict) or not all(isinstance(v, dict) for v in strategies.values()):
            raise ConfigError(f"{where} strategies must map strategy names to their options, e.g. strategies: {{dmcp: {{search_epochs: 4}}}}")
        for key in ("model", "dataset"):
            if key not in data:
                raise ConfigError(f"{where} has no '{key}' section; add one (see automlprune/envs/digits-cnn.yaml)")
        model, dataset = data["model"], data["dataset"]
        model = {"name": model} if isinstance(model, str) else model
        dataset = {"name": dataset} if isinstance(dataset, str) else dataset
        for section, what in ((model, "model"), (dataset, "dataset")):  # your own code: {python: package.module:function}
            if isinstance(section, dict) and "python" in section:
                if "name" in section:
                    raise ConfigError(f"{where} {what} gives both a name and python; give one of them")
                section["name"] = f"python:{section.pop('python')}"
        check_keys(model, {"name", "kwargs"}, f"{where} model")
        if not isinstance(dataset, dict) or "name" not in dataset:
            raise ConfigError(f"{where} dataset needs a name (digits, fashion-mnist, cifar10, imagefolder) or python: package.module:function")
        if dataset["name"].startswith("python:"):
            check_keys(dataset, {"name", "kwargs"}, f"{where} dataset")
        else:
            check_keys(dataset, {"name", "root", "val_size", "seed", "download", "image_size", "test_dir"}, f"{where} dataset")
        if "root" in dataset and (dataset["root"] is None or not str(dataset["root"]).strip()):
            raise ConfigError(f"{where} dataset root is empty; give the folder holding the data, or remove the key to use the default places")
        name = str(data.get("name") or (source.stem if source else "task"))
        return cls(
            name=name, model=str(model["name"]), model_kwargs=dict(model.get("kwargs") or {}),
            dataset=str(dataset["name"]), dataset_options={k: v for k, v in dataset.items() if k != "name"},
            checkpoint=Path(data.get("checkpoint") or f"results/checkpoints/{name}.pt"),
            auto_train=bool(data.get("auto_train", False)), space=str(data.get("space", "default")),
            train=read_settings(TrainSettings, data.get("train"), f"{where} train"),
            evaluation=read_settings(EvalSettings, data.get("evaluation"), f"{where} evaluation"),
            finetune=read_settings(FinetuneSettings, data.get("finetune"), f"{where} finetune"),
            strategies={str(k): dict(v) for k, v in strategies.items()},
            description=str(data.get("description", "")), source=source,
        )

    @classmethod
    def load(cls, name_or_path: str | Path, overrides: Sequence[str] = ()) -> "TaskSpec":
        path = resolve_config(name_or_path, "envs")
        data = apply_overrides(read_yaml(path, "task"), overrides)
        return cls.from_dict(data, source=path)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "TaskSpec":
        """Inverse of :meth:`to_dict` (a run directory's saved task)."""
        data = dict(data)
        for key, settings in (("train", TrainSettings), ("evaluation", EvalSettings), ("finetune", FinetuneSettings)):
            data[key] = read_settings(settings, data.get(key), key)
        data["checkpoint"] = Path(data["checkpoint"])
        data["source"] = Path(data["source"]) if data.get("source") else None
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint"], out["source"] = str(self.checkpoint), str(self.source) if self.source else None
        return out


def resolve_config(name_or_path: str | Path, kind: str) -> Path:
    """A config file given as a path, or as a name looked up in ``./<kind>/`` (your own files,
    from the current directory) then in the ``<kind>/`` folder shipped inside the package."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{kind[:-1] if kind.endswith('s') else kind} file {path} does not exist; check the path")
        return path
    for folder in (Path.cwd() / kind, SHIPPED / kind):
        for suffix in (".yaml", ".yml"):
            if (folder / f"{name_or_path}{suffix}").is_file():
                return folder / f"{name_or_path}{suffix}"
    raise ConfigError(f"no {kind} config named '{name_or_path}'; choose one of: {', '.join(list_configs(kind)) or '(none found)'}")


def list_configs(kind: str) -> list[str]:
    names: set[str] = set()
    for folder in (Path.cwd() / kind, SHIPPED / kind):
        if folder.is_dir():
            names |= {p.stem for p in folder.glob("*.yaml")}
    return sorted(names)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"the value in override '{item}' is not valid YAML") from None
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        target[parts[-1]] = value
    return data


class Task:
    """A loaded task: its data (loaded on first use), models and search space."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self._data = None

    @property
    def data(self):
        from automlprune.data import load_dataset

        if self._data is None:
            if self.spec.dataset.startswith("python:"):
                self._data = python_datasets(self.spec.dataset[len("python:"):], self._search_folders(),
                                             **self.spec.dataset_options.get("kwargs", {}))
            else:
                self._data = load_dataset(self.spec.dataset, **self.spec.dataset_options)
        return self._data

    def _search_folders(self) -> tuple[Path, ...]:
        """Where a task's own Python code is looked for besides the current directory: the task file's folder."""
        return (self.spec.source.resolve().parent,) if self.spec.source else ()

    def build_model(self):
        """The task's architecture with fresh weights."""
        from automlprune.models import build_model
        from automlprune.models.zoo import build_python_model

        if self.spec.model.startswith("python:"):
            return build_python_model(self.spec.model[len("python:"):], self.data.num_classes, self.data.in_channels,
                                      self._search_folders(), **self.spec.model_kwargs)
        return build_model(self.spec.model, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
                           **self.spec.model_kwargs)

    def architecture(self) -> dict[str, Any]:
        """How :meth:`build_model` builds the network (registry name and arguments), as recorded in
        packed exports so they load without pickled structure."""
        return {"model": self.spec.model, "num_classes": self.data.num_classes, "in_channels": self.data.in_channels,
                "kwargs": dict(self.spec.model_kwargs)}

    def checkpoint_identity(self) -> dict[str, Any]:
        """Metadata a checkpoint must match to be used for this task."""
        return {"model": self.spec.model, "model_kwargs": self.spec.model_kwargs, "dataset": self.spec.dataset}

    def load_model(self):
        """The trained baseline: the task's architecture with its checkpoint's weights."""
        from automlprune.models import load_weights

        if not self.spec.checkpoint.is_file():
            hint = f"automlprune train {self.spec.source or self.spec.name}"
            raise CheckpointError(f"checkpoint {self.spec.checkpoint} of task '{self.spec.name}' does not exist; make it with '{hint}'")
        model = self.build_model()
        load_weights(model, self.spec.checkpoint, self.checkpoint_identity())
        return model.eval()

    def space_config(self, name_or_path: str | None = None):
        from automlprune.space import SpaceConfig

        return SpaceConfig.load(resolve_config(name_or_path or self.spec.space, "search_spaces"))

    def search_space(self, model=None, space: str | None = None):
        """The search space of ``model`` (default: a fresh build of the architecture; the
        structure does not depend on the weights)."""
        from automlprune.space import SearchSpace

        model = model if model is not None else self.build_model()
        device = next(model.parameters()).device
        return SearchSpace(model, self.data.example_input().to(device), self.space_config(space))


def python_datasets(reference: str, search: tuple[Path, ...] = (), **kwargs: Any):
    """A task's own data from ``package.module:make_datasets`` (``dataset: {python: ...}``):
    the function returns :class:`~automlprune.data.DataSplits`, or a dict with ``train`` (and
    optionally ``val``, ``test``) as Datasets or ``(inputs, labels)`` tensors and ``num_classes``;
    inputs as the model takes them (see :func:`automlprune.api.user_data`)."""
    from automlprune.data.user import as_split, user_data
    from automlprune.data.base import DataSplits
    from automlprune.registry import import_object

    made = import_object(reference, search)(**kwargs)
    if isinstance(made, DataSplits):
        return made
    if not isinstance(made, dict) or "train" not in made or "num_classes" not in made:
        raise ConfigError(f"{reference} must return DataSplits or a dict with train, num_classes (and optionally val, test)")
    x, _ = as_split(made["train"], "train")[0]
    return user_data(made["train"], made.get("val"), made.get("test"), x.unsqueeze(0), int(made["num_classes"]))
