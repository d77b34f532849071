"""The rules file: pydantic models, the shipped defaults, and loading with errors that point at a line.

A rules file has three parts (see docs/rules.md)::

    dry_run: false            # true: every rule and guard only observes
    guards: {...}             # in the probe, at the same step: skip step, clipping, snapshots
    rules: [...]              # in the agent: a detector on a metric, an action, bounds, a mode

A bad file raises ConfigError naming the file, the line, the field path and what was
expected, e.g. ``rules.yaml:7: rules[1].detect.patience = 'ten': Input should be a valid integer``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from gradwatch.errors import ConfigError
from gradwatch.rules.bounded_yaml import MAX_YAML_BYTES, compose_bounded, named_stream
from gradwatch.rules.catalogue_specs import CATALOGUE_SPECS, CatalogueSpecs, implied_metric
from gradwatch.rules.spec_base import SpecModel

Mode = Literal["observe", "act"]
Severity = Literal["critical", "warning", "info", "none"]
GuardMode = Literal["off", "observe", "act"]
Direction = Literal["min", "max"]


_Model = SpecModel


# -- detectors ------------------------------------------------------------------------------------
class NonFinite(_Model):
    """Fires when the metric is NaN or infinite ``consecutive`` observations in a row."""

    type: Literal["nonfinite"]
    consecutive: int = Field(1, ge=1)


class Spike(_Model):
    """Upward spike: z-score against an EMA mean/variance that outliers and NaN never enter."""

    type: Literal["spike"]
    z_threshold: float = Field(6.0, gt=0)
    alpha: float = Field(0.02, gt=0, lt=1)
    warmup: int = Field(20, ge=2)
    readapt_after: int = Field(20, ge=1)


class Divergence(_Model):
    """The smoothed metric stays above ``factor`` x its best for ``patience`` observations, or (with
    ``trend_steps``) rises ``trend_steps`` observations in a row and is above ``1 + min_rise`` x best."""

    type: Literal["divergence"]
    mode: Direction = "min"
    factor: float = Field(3.0, gt=1)
    patience: int = Field(10, ge=1)
    warmup: int = Field(20, ge=1)
    alpha: float = Field(0.1, gt=0, le=1)
    trend_steps: int | None = Field(None, ge=2)
    min_rise: float = Field(0.2, ge=0)


class Plateau(_Model):
    """torch.optim.lr_scheduler.ReduceLROnPlateau's decision, with its defaults."""

    type: Literal["plateau"]
    mode: Direction = "min"
    patience: int = Field(10, ge=0)
    threshold: float = Field(1e-4, ge=0)
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = Field(0, ge=0)


class EarlyStopping(_Model):
    """Lightning's EarlyStopping decision (plus Keras' ``baseline``), with Lightning's defaults."""

    type: Literal["early_stopping"]
    mode: Direction = "min"
    min_delta: float = 0.0
    patience: int = Field(3, ge=0)
    baseline: float | None = None
    check_finite: bool = True
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None
    dtype: Literal["float32", "float64"] = "float32"  # Lightning compares logged (float32) tensors


class Threshold(_Model):
    """The metric is above ``above`` (or below ``below``) for ``patience`` observations in a row."""

    type: Literal["threshold"]
    above: float | None = None
    below: float | None = None
    patience: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_bound(self) -> Threshold:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of 'above' or 'below'")
        return self


DetectorSpecs = NonFinite | Spike | Divergence | Plateau | EarlyStopping | Threshold | CatalogueSpecs
DETECTOR_SPECS: tuple[type[_Model], ...] = (NonFinite, Spike, Divergence, Plateau, EarlyStopping, Threshold,
                                            *CATALOGUE_SPECS)
DetectorSpec = Annotated[DetectorSpecs, Field(discriminator="type")]


# -- actions --------------------------------------------------------------------------------------
class NoAction(_Model):
    """No action: the rule observes (records the decision, exports it, alerts). A catalogue rule's default."""

    type: Literal["none"] = "none"


class Stop(_Model):
    """End training: ``probe.should_stop`` becomes True (or StopTraining is raised, see attach(on_stop=))."""

    type: Literal["stop"]


class ReduceLR(_Model):
    """Every param group: ``new = max(lr * factor, min_lr)``, applied only if ``lr - new > eps`` (torch)."""

    type: Literal["reduce_lr"]
    factor: float = Field(0.1, gt=0, lt=1)
    min_lr: float | list[float] = 0.0
    eps: float = Field(1e-8, ge=0)

    @field_validator("min_lr")
    @classmethod
    def _non_negative(cls, v: float | list[float]) -> float | list[float]:
        if any(x < 0 for x in (v if isinstance(v, list) else [v])):
            raise ValueError("min_lr must be >= 0")
        return v


class ScaleClip(_Model):
    """Multiply the fixed clipping threshold by ``factor``, kept within [min_max_norm, max_max_norm]."""

    type: Literal["scale_clip"]
    factor: float = Field(gt=0)
    min_max_norm: float = Field(1e-3, gt=0)
    max_max_norm: float = Field(1e3, gt=0)


class Rewind(_Model):
    """Restore model and optimizer from the newest in-memory snapshot taken at least ``min_back_steps``
    before the trigger (a spike starts before it is detected), then skip the updates of the next
    ``skip_steps`` batches. PaLM's recipe: back ~100 steps, skip 200-500 batches."""

    type: Literal["rewind"]
    skip_steps: int = Field(0, ge=0)
    min_back_steps: int = Field(50, ge=1)


ACTION_SPECS: tuple[type[_Model], ...] = (NoAction, Stop, ReduceLR, ScaleClip, Rewind)
Action = Annotated[NoAction | Stop | ReduceLR | ScaleClip | Rewind, Field(discriminator="type")]


#: What the agent observes on every run without anything logged (agent/state.py); other metrics are the
#: names a run logs (probe.log, gradwatch.log, the frameworks' metrics).
BUILT_IN_METRICS = ("loss", "grad_norm", "lr", "step_duration_seconds", "steps_per_second", "samples_per_second",
                    "data_wait_seconds")
#: Not built in, but the conventional name the shipped rules watch and the Transformers callback maps to.
CONVENTIONAL_METRICS = ("val_loss",)


class Rule(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    metric: str = Field(min_length=1, max_length=100)  # a catalogue rule's is implied by its type
    detect: DetectorSpec
    action: Action = NoAction()
    mode: Mode = "observe"
    max_actions: int | None = Field(None, ge=1, description="the rule acts at most this often per run")
    cooldown_steps: int = Field(0, ge=0, description="steps after a firing during which the rule stays quiet")
    start_step: int = Field(0, ge=0, description="observations before this step are ignored (like Keras' "
                                                   "start_from_epoch, Lightning's min_steps)")
    alert: Severity = Field("warning", description="severity of the alert the agent sends when the rule's detector "
                                                   "fires (none: no alert)")
    optimizer: str = Field("0", pattern=r"^[A-Za-z0-9_-]{1,40}$",
                           description="the optimizer whose series the rule watches and whose LR a reduce_lr "
                                       "cuts: \"0\" is the run's first (docs/attaching.md, Several optimizers)")

    @model_validator(mode="before")
    @classmethod
    def _implied_metric(cls, data: Any) -> Any:
        """A catalogue rule (``detect: {type: dead_relu}``) reads what its type names: no ``metric:`` to give."""
        if isinstance(data, dict) and isinstance(data.get("detect"), dict):
            implied = implied_metric(data["detect"].get("type"))
            if implied is not None:
                if "metric" in data and data["metric"] != implied:
                    raise ValueError(f"detect type {data['detect']['type']!r} reads {implied!r}; leave 'metric' out")
                data = {**data, "metric": implied}
        return data

    @model_validator(mode="after")
    def _acting_needs_an_action(self) -> Rule:
        if self.mode == "act" and self.action.type == "none":
            raise ValueError("mode 'act' needs an action (stop, reduce_lr, scale_clip, rewind); without one the rule "
                             "observes")
        return self

    @property
    def catalogue(self) -> bool:
        return implied_metric(self.detect.type) is not None


# -- guards (in the probe) ----------------------------------------------------------------------------
class SkipGuard(_Model):
    on_nonfinite: GuardMode = "act"
    on_spike: GuardMode = "off"
    spike_z_threshold: float = Field(10.0, gt=0)
    spike_alpha: float = Field(0.02, gt=0, lt=1)
    spike_warmup: int = Field(50, ge=2)

    @field_validator("on_nonfinite", "on_spike", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads an unquoted `off` as false


class ClipGuard(_Model):
    scheme: Literal["none", "fixed", "autoclip", "zclip"] = "none"
    mode: Literal["observe", "act"] = "act"
    max_norm: float | None = Field(1.0, gt=0, description="fixed: the threshold; zclip: a cap (null: none)")
    percentile: float = Field(10.0, ge=0, le=100, description="autoclip: percentile of the norm history")
    history: int = Field(10_000, ge=1, le=1_000_000, description="autoclip: norms kept (bounded memory)")
    alpha: float = Field(0.97, gt=0, lt=1, description="zclip: EMA smoothing")
    z_threshold: float = Field(2.5, gt=0, description="zclip: z-score above which a norm is a spike")
    warmup: int = Field(25, ge=1, description="zclip: norms collected before the EMA starts")
    clip_factor: float = Field(1.0, gt=0, description="zclip: multiplies the adaptive threshold")
    eps: float = Field(1e-6, gt=0, description="zclip: added to the standard deviation")

    @model_validator(mode="after")
    def _fixed_needs_norm(self) -> ClipGuard:
        if self.scheme == "fixed" and self.max_norm is None:
            raise ValueError("scheme 'fixed' needs max_norm")
        return self


class SnapshotSettings(_Model):
    every: int = Field(100, ge=1, description="steps between in-memory snapshots (for rewind)")
    keep: int = Field(2, ge=1, le=16, description="snapshots kept; memory is keep x (model + optimizer state)")
    enabled: bool | None = Field(None, description="default: on when a rewind rule acts")


class Guards(_Model):
    skip: SkipGuard = SkipGuard()
    clip: ClipGuard = ClipGuard()
    snapshots: SnapshotSettings = SnapshotSettings()


class RulesConfig(_Model):
    version: Literal[1] = 1
    dry_run: bool = False
    guards: Guards = Guards()
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: list[Rule]) -> list[Rule]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice; names must be unique")
            seen.add(rule.name)
        return rules

    def acting(self, rule: Rule) -> bool:
        return rule.mode == "act" and not self.dry_run

    @property
    def snapshots_enabled(self) -> bool:
        snap = self.guards.snapshots
        if snap.enabled is not None:
            return snap.enabled
        return any(r.action.type == "rewind" and self.acting(r) for r in self.rules)


# -- loading ----------------------------------------------------------------------------------------
DEFAULT_RULES_FILE = "default_rules.yaml"


def default_rules() -> RulesConfig:
    """The rules that ship with gradwatch (docs/rules.md lists them)."""
    text = resources.files("gradwatch.rules").joinpath(DEFAULT_RULES_FILE).read_text(encoding="utf-8")
    return parse_rules(text, source=f"<packaged {DEFAULT_RULES_FILE}>")


def read_rules_text(path: str | os.PathLike[str]) -> str:
    path = Path(path).expanduser()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_YAML_BYTES + 1)  # never more than the cap into memory
    except OSError as exc:
        raise ConfigError(f"cannot read rules file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"rules file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"rules file {path} is larger than {MAX_YAML_BYTES} bytes; a rules file is a few kilobytes")
    return text


def load_rules(path: str | os.PathLike[str]) -> RulesConfig:
    return parse_rules(read_rules_text(path), source=str(Path(path).expanduser()))


def rules_from(value: RulesConfig | dict[str, Any] | str | os.PathLike[str] | None) -> RulesConfig:
    """Rules given in Python: a RulesConfig, a dict shaped like the YAML file, or a file path."""
    if value is None:
        return default_rules()
    if isinstance(value, RulesConfig):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_rules(value)
    if isinstance(value, dict):
        return _validate(value, source="rules given in Python", node=None)
    raise ConfigError(f"rules must be a RulesConfig, a dict or a path to a YAML file, got {type(value).__name__}")


def parse_rules(text: str, source: str) -> RulesConfig:
    try:  # a named stream: YAML's error marks then name the file, not "<unicode string>"
        node = compose_bounded(text, source)  # a size cap, and aliases that cannot expand without end
        data = yaml.safe_load(named_stream(text, source))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'guards' and 'rules', got {type(data).__name__}")
    return _validate(data, source=source, node=node)


def _validate(data: dict[str, Any], source: str, node: yaml.Node | None) -> RulesConfig:
    try:
        return RulesConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(err, source, node) for err in exc.errors()]
        sep = "\n  " if len(problems) > 1 else " "
        raise ConfigError(f"invalid rules ({source}):{sep}" + sep.join(problems)) from None


def _describe(err: Any, source: str, node: yaml.Node | None) -> str:
    # pydantic adds the discriminator's tag to the location (rules.0.detect.plateau.patience): drop it
    loc = [part for part in err["loc"] if not (isinstance(part, str) and (part in _UNION_TAGS or _is_wrapper(part)))]
    path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    line = _line_of(node, loc)
    where = f"line {line}: " if line is not None else ""
    value = err.get("input")
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"{where}{path}: unknown field; check its spelling (docs/rules.md lists the fields)"
    if err["type"] == "union_tag_invalid":
        tag = value.get("type") if isinstance(value, dict) else value
        return f"{where}{path}.type = {_short(tag)}: {msg}"
    if err["type"] == "missing":
        return f"{where}{path}: required field is missing"
    shown = "" if isinstance(value, dict) else f" = {_short(value)}"
    return f"{where}{path}{shown}: {msg}"


# the `type` tags of the discriminated unions: pydantic puts the chosen tag into an error's location
_UNION_TAGS = frozenset(get_args(spec.model_fields["type"].annotation)[0] for spec in DETECTOR_SPECS + ACTION_SPECS)


def _is_wrapper(part: str) -> bool:
    """A location part naming a validator wrapper (pydantic's ``function-after[...]`` and kin), not a field."""
    return part.startswith("function-") and part.endswith("]")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of its deepest existing parent)."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            child = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if child is None:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            return line
        node, line = child, child.start_mark.line + 1
    return line

