"""The training recipe: one ``recipe.toml`` per adapter inbox, read with tomllib into a :class:`Recipe`.

Every setting has a default, so an inbox without a recipe still trains: the class defaults suit the tiny test bases,
:data:`REAL_BASE_DEFAULTS` a real one (:func:`recipe_defaults`). A recipe without ``base`` trains on the daemon's
default base. A recipe that is present but wrong (bad TOML, an unknown key, a wrong type, a value out of range) is
an error, never a silent fallback to the defaults: :func:`parse_recipe` raises :class:`RecipeError` listing every
problem, and the ingest step quarantines the file and refuses the run with that message.

Each setting carries its help text (``metadata["help"]``); :func:`recipe_reference` renders every setting with it
as a ``recipe.toml`` (the README's recipe section is that, for the real base, checked by a test).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE_FILE = "recipe.toml"


def _setting(default: Any, help: str) -> Any:
    """A recipe setting with its help text (``solverx`` renders the reference from it: :func:`recipe_reference`)."""
    return field(default=default, metadata={"help": help})


class RecipeError(ValueError):
    """A recipe.toml that cannot be used; the message lists every problem, one per line."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int = _setting(16, "LoRA rank of every adapted projection")
    scale: float = _setting(5.0, "LoRA scale (alpha); with learning_rate, how far the adapter moves")
    dropout: float = _setting(0.0, "LoRA dropout")
    num_layers: int = _setting(-1, "the last N transformer blocks get LoRA; -1: every block")
    keys: list[str] | None = field(
        default=None, metadata={"help": 'projections to adapt, e.g. ["self_attn.q_proj"]; unset: every linear'}
    )

    def as_mlx_config(self) -> dict[str, Any]:
        """The ``lora_parameters`` dict mlx-lm's ``linear_to_lora_layers`` and ``adapter_config.json`` expect."""
        from solverx.engine.lora import DEFAULT_KEYS  # every projection of a block unless the recipe narrows it

        keys = self.keys if self.keys is not None else DEFAULT_KEYS
        return {"rank": self.rank, "scale": self.scale, "dropout": self.dropout, "keys": list(keys)}


@dataclass(frozen=True)
class TrainSettings:
    cpt_iters: int = _setting(200, "continual pre-training steps on the raw text (0 skips the stage)")
    sft_iters: int = _setting(600, "SFT steps on Q&A, chats and identity, prompt masked, resumed from CPT (0 skips)")
    learning_rate: float = _setting(5e-4, "Adam learning rate")
    lr_schedule: str = _setting("constant", '"constant", or "cosine": warm up over 5 % of the steps, then decay to 0')
    batch_size: int = _setting(4, "sequences per step (batched by like length)")
    max_seq_length: int = _setting(512, "longest sequence in tokens; longer chats are left out, with a note")
    replay_ratio: float = _setting(0.2, "share of every batch's sequences drawn from replay, mixed per sequence")
    replay_source: str = _setting(
        "general", '"self": the base\'s own answers to general questions; "general": data/general'
    )
    self_replay_prompts: int = _setting(200, "general questions the base answers once (cached) for self replay")
    valid_fraction: float = _setting(0.1, "share of the replay held out for the validation loss (rising: forgetting)")


@dataclass(frozen=True)
class EvalGate:
    min_domain_accuracy: float = _setting(0.5, "share of eval.jsonl domain questions answered correctly")
    max_leakage_rate: float = _setting(0.2, "share of off-domain answers allowed to mention the domain")
    min_retention: float = _setting(0.8, "general-probe score relative to the base model's")


@dataclass(frozen=True)
class Identity:
    name: str = _setting("SolverX Assistant", 'who the model says it is; "": no identity samples')
    maker: str = _setting("SolverX", "who it says made it")


@dataclass(frozen=True)
class Grounding:
    enabled: bool = _setting(False, "put the version's facts on the question's entities in the prompt (fact graph)")
    top_k: int = _setting(3, "facts put in the prompt, best first")
    min_score: float = _setting(0.6, "how fully a question must name a domain entity (1: a whole name) to add facts")
    max_leakage_increase: float = _setting(0.0, "gate: grounding may raise the off-domain leakage rate this much")
    train_fraction: float = _setting(
        0.0, "share of the chats also trained with their retrieved facts in the prompt, as served"
    )
    aliases: dict[str, list[str]] = field(
        default_factory=dict, metadata={"help": 'other names of an entity, e.g. {"SolverX" = ["솔버엑스"]}'}
    )


@dataclass(frozen=True)
class Recipe:
    base: str = _setting("solverx-tiny", "base model id (unset: the daemon's default base)")
    seed: int = _setting(0, "data order, splits and replay sampling")
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalGate = field(default_factory=EvalGate)
    identity: Identity = field(default_factory=Identity)
    grounding: Grounding = field(default_factory=Grounding)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for run manifests and the registry."""
        return dataclasses.asdict(self)


# Defaults for a real base (SmolLM2-135M-Instruct and up), measured on the default base with data/solverx:
# see the README's recipe section. The tiny bases keep the class defaults above.
REAL_BASE_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 16, "scale": 2.0, "num_layers": 16},
    "train": {
        "cpt_iters": 6,
        "sft_iters": 220,  # ~3 passes over the English half of data/solverx, ~9 min on 2 cores
        "learning_rate": 4e-4,
        "batch_size": 4,
        "max_seq_length": 384,
        "replay_ratio": 0.25,  # seeds 0, 1: 22, 21/29 held-out, general 24, 22/33; at 0.35: 19, 18/29 and 22, 18/33
        "replay_source": "self",
        "self_replay_prompts": 130,  # the 70 of data/replay/questions.txt and 60 general ones: ~2 min, once a base
    },
    "eval": {"min_domain_accuracy": 0.5, "max_leakage_rate": 0.1, "min_retention": 0.9},
    "grounding": {"enabled": True},
}


def recipe_defaults(base_id: str) -> Recipe:
    """What a recipe that sets nothing means on ``base_id``: the tiny bases' defaults or a real base's."""
    from solverx.models.builtin import is_tiny

    recipe = Recipe(base=base_id)
    if is_tiny(base_id):
        return recipe
    tables = {name: dataclasses.replace(getattr(recipe, name), **values) for name, values in REAL_BASE_DEFAULTS.items()}
    return dataclasses.replace(recipe, **tables)


# Table name in recipe.toml -> settings class; top-level scalars live on Recipe itself.
_TABLES: dict[str, type] = {
    "lora": LoraSettings, "train": TrainSettings, "eval": EvalGate, "identity": Identity, "grounding": Grounding,
}  # fmt: skip
_TOP_LEVEL: dict[str, type] = {"base": str, "seed": int}

# (table, key) -> (lowest, highest, whether the lowest is allowed); None means unbounded.
_RANGES: dict[tuple[str, str], tuple[float | None, float | None, bool]] = {
    ("lora", "rank"): (1, 1024, True),
    ("lora", "scale"): (0.0, None, False),
    ("lora", "dropout"): (0.0, 1.0, True),
    ("train", "cpt_iters"): (0, None, True),
    ("train", "sft_iters"): (0, None, True),
    ("train", "learning_rate"): (0.0, 1.0, False),
    ("train", "batch_size"): (1, 4096, True),
    ("train", "max_seq_length"): (32, 1 << 20, True),
    ("train", "replay_ratio"): (0.0, 0.95, True),
    ("train", "self_replay_prompts"): (1, 100_000, True),
    ("train", "valid_fraction"): (0.0, 0.5, True),
    ("eval", "min_domain_accuracy"): (0.0, 1.0, True),
    ("eval", "max_leakage_rate"): (0.0, 1.0, True),
    ("eval", "min_retention"): (0.0, 10.0, True),
    ("grounding", "top_k"): (1, 32, True),
    ("grounding", "min_score"): (0.0, 1.0, False),
    ("grounding", "max_leakage_increase"): (0.0, 1.0, True),
    ("grounding", "train_fraction"): (0.0, 1.0, True),
}
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("train", "replay_source"): ("general", "self"),
    ("train", "lr_schedule"): ("constant", "cosine"),
}


def format_recipe(tables: Mapping[str, Mapping[str, Any]], **top: Any) -> str:
    """``recipe.toml`` text for top-level keys and ``{table: {key: value}}`` (strings, numbers, booleans, lists).

    It writes what it is given, valid or not (tests drop bad recipes on purpose); :func:`parse_recipe` judges it.
    JSON's spelling of these values is TOML's too.
    """
    lines = [f"{key} = {_toml(value)}" for key, value in top.items()]
    for table, values in tables.items():
        lines.append(f"\n[{table}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """A TOML value: JSON's spelling, except that a table is inline ``{ "key" = value, ... }``."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def recipe_reference(recipe: Recipe) -> str:
    """``recipe`` as a ``recipe.toml`` with every setting and its help text (the README shows the real base's)."""

    def line(obj: Any, f: dataclasses.Field) -> str:
        value = getattr(obj, f.name)
        text = f"# {f.name} = (unset)" if value is None else f"{f.name} = {_toml(value)}"
        return f"{text:<32} # {f.metadata['help']}"

    lines = [line(recipe, f) for f in dataclasses.fields(recipe) if f.name in _TOP_LEVEL]
    for table in _TABLES:
        lines += ["", f"[{table}]"] + [line(getattr(recipe, table), f) for f in dataclasses.fields(_TABLES[table])]
    return "\n".join(lines) + "\n"


def load_recipe(path: str | Path, defaults: Recipe | None = None) -> Recipe:
    """Read a recipe file; values it sets override ``defaults`` (the daemon's defaults, else :class:`Recipe`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    return parse_recipe(text, defaults)


def parse_recipe(text: str, defaults: Recipe | None = None) -> Recipe:
    """Parse recipe TOML; raise :class:`RecipeError` naming every unknown key, wrong type and bad value."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"invalid TOML: {exc}") from None

    base = defaults or Recipe()
    if isinstance(data.get("base"), str) and data["base"].strip() and data["base"] != base.base:
        base = recipe_defaults(data["base"])  # a recipe naming another base gets that base's defaults
    problems: list[str] = []
    top: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key in _TABLES:
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a table [{key}], got {_type_name(value)}")
                continue
            tables[key] = _check_table(key, value, _TABLES[key], problems)
        elif key in _TOP_LEVEL:
            if _accepts(_TOP_LEVEL[key], value):
                top[key] = value
            else:
                problems.append(f"{key}: expected {_TOP_LEVEL[key].__name__}, got {_describe(value)}")
        else:
            problems.append(f"{key}: unknown key (known: {', '.join([*_TOP_LEVEL, *_TABLES])})")

    if "base" in top and not top["base"].strip():
        problems.append("base: must not be empty")
    if problems:
        raise RecipeError("\n".join(problems))

    return dataclasses.replace(
        base,
        **top,
        **{name: dataclasses.replace(getattr(base, name), **values) for name, values in tables.items()},
    )


def _check_table(table: str, values: dict[str, Any], cls: type, problems: list[str]) -> dict[str, Any]:
    """The keys of one table that are known, well-typed and in range; everything else is added to ``problems``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    good: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{table}.{key}"
        if key not in fields:
            problems.append(f"{where}: unknown key (known: {', '.join(fields)})")
            continue
        expected = _field_type(table, key)
        if expected is dict:
            if not isinstance(value, dict) or not all(
                isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v) for v in value.values()
            ):
                problems.append(f"{where}: expected a table of names to lists of other names, got {_describe(value)}")
                continue
        elif expected is list:
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                problems.append(f"{where}: expected a non-empty list of strings, got {_describe(value)}")
                continue
        elif not _accepts(expected, value):
            problems.append(f"{where}: expected {expected.__name__}, got {_describe(value)}")
            continue
        if expected is float:
            value = float(value)
        if (bad := _range_problem(table, key, value)) is not None:
            problems.append(f"{where}: {bad}")
            continue
        good[key] = value
    if table == "lora" and "num_layers" in good and good["num_layers"] != -1 and good["num_layers"] < 1:
        problems.append("lora.num_layers: must be -1 (every block) or at least 1")
        good.pop("num_layers")
    return good


def _field_type(table: str, key: str) -> type:
    if (table, key) == ("lora", "keys"):
        return list
    if (table, key) == ("grounding", "aliases"):
        return dict
    default = getattr(_TABLES[table](), key)
    return type(default)


def _accepts(expected: type, value: Any) -> bool:
    """TOML type check: bools are not ints, and ints are fine where a float is wanted."""
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def _range_problem(table: str, key: str, value: Any) -> str | None:
    if (choices := _CHOICES.get((table, key))) is not None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}, got {value!r}"
    low, high, low_inclusive = _RANGES.get((table, key), (None, None, True))
    if low is not None and (value < low or (value == low and not low_inclusive)):
        return f"must be {'at least' if low_inclusive else 'greater than'} {low}, got {value}"
    if high is not None and value > high:
        return f"must be at most {high}, got {value}"
    return None


def _type_name(value: Any) -> str:
    return {dict: "table", list: "array", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    return f"{_type_name(value)} {value!r}"
