"""Reward registry, recipe specs and the weighted combiner used by the GRPO loop.

A reward function has TRL's signature::

    f(prompts, completions, *, <params>..., **columns) -> list[float | None]

``prompts``/``completions`` are strings or conversational message lists, exactly as TRL's
``GRPOTrainer`` passes them (use :func:`completion_text`/:func:`prompt_text` to get text).
Dataset columns (``answer``, ``tests``, ``completion_ids`` ...) arrive as keyword lists, one
value per row, so a function must accept ``**columns`` (as TRL requires too). ``None`` (or
NaN) in the output means "not applicable to this row".

The function's *keyword-only* parameters are its recipe parameters; everything else it
receives comes from the dataset columns. Recipe block, one entry per reward::

    rewards:
      - name: math                    # registered name, or "package.module:function"
        weight: 1.0                   # optional, default 1.0
        params: {gold_column: answer} # optional, keyword-only parameters of the function
        label: math_main              # optional, key in logs; needed when a name repeats
      - format                        # a bare name means {"name": "format"}

Params are merged over the columns, so a param wins over a column of the same name.

Combining (:func:`combine_scores`, TRL's GRPOTrainer rule): ``total[i] = sum(weight_k * r_k[i])``
over the rewards whose value for row ``i`` is not ``None``; a row where every reward is ``None``
is unscorable and gets NaN, so the advantage step leaves it out of its group's statistics and
gives it advantage 0. A reward that raises (or returns the wrong number of values, or a
non-number) is logged with ``logging.warning`` and a traceback summary, counted in ``errors``,
and scores ``None`` for the whole batch; the other rewards and the run go on. ``errors`` maps
every reward's name to 0 or 1 for the batch; :func:`reward_metrics` turns the output into the
scalars the RL loop logs.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float | None]]
Scores = list[float | None]

_REGISTRY: dict[str, RewardFn] = {}
_CHECKS: dict[str, Callable[[Mapping[str, Any]], object]] = {}
_SPEC_KEYS = ("name", "weight", "params", "label")


class RewardConfigError(ValueError):
    """A reward spec in a recipe is invalid (unknown name, bad param, import failure)."""


def register(name: str, check: Callable[[Mapping[str, Any]], object] | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name`` (names are unique).

    ``check(params)``, when given, validates param values at build time by raising
    ``ValueError``/``TypeError``; :func:`build_rewards` turns that into a config error.
    """

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = fn
        if check is not None:
            _CHECKS[name] = check
        return fn

    return wrap


def registered() -> list[str]:
    """Sorted names of the registered rewards."""
    return sorted(_REGISTRY)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
    return str(content)


def completion_text(completion: Any) -> str:
    """Text of one completion: a string, one message dict, or a list of messages.

    For a message list the contents of the assistant messages are joined (all messages
    when none has role ``assistant``).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content"))
    messages = list(completion)
    chosen = [m for m in messages if m.get("role") == "assistant"] or messages
    return "".join(_content_text(m.get("content")) for m in chosen)


def prompt_text(prompt: Any) -> str:
    """Text of one prompt (string, or messages joined by newlines)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        return _content_text(prompt.get("content"))
    return "\n".join(_content_text(m.get("content")) for m in prompt)


def as_messages(prompt: Any, role: str = "user") -> list[dict[str, Any]]:
    """A prompt or completion as a list of chat messages (a string becomes one ``role`` message)."""
    if isinstance(prompt, str):
        return [{"role": role, "content": prompt}]
    if isinstance(prompt, Mapping):
        return [dict(prompt)]
    return [dict(m) for m in prompt]


@dataclass(frozen=True)
class WeightedReward:
    """A reward function bound to its params and weight; callable like a TRL reward function."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def __name__(self) -> str:  # TRL names reward functions by __name__
        return self.name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> Scores:
        return self.fn(prompts, completions, **{**columns, **self.params})


def _resolve(name: str, where: str) -> RewardFn:
    if ":" in name:
        return _import_function(name, where)
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, registered(), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RewardConfigError(
        f"{where}: unknown reward {name!r}.{hint} Valid names: {', '.join(registered())}, "
        "or 'package.module:function' for your own function."
    )


def _import_function(target: str, where: str) -> RewardFn:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise RewardConfigError(f"{where}: {target!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise RewardConfigError(
            f"{where}: cannot import module {module_name!r} for reward {target!r}: "
            f"{type(exc).__name__}: {exc} (is it installed or on PYTHONPATH?)"
        ) from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardConfigError(f"{where}: {target!r} is not callable")
    return fn


def reward_params(fn: RewardFn) -> dict[str, inspect.Parameter]:
    """The recipe parameters of ``fn``: its keyword-only parameters."""
    sig = inspect.signature(fn)
    return {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_params(fn: RewardFn, params: Mapping[str, Any], where: str) -> None:
    accepted = reward_params(fn)
    valid = ", ".join(accepted) or "(none)"
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RewardConfigError(f"{where}: unknown param {key!r}.{hint} Valid params: {valid}")
    missing = [n for n, p in accepted.items() if p.default is inspect.Parameter.empty and n not in params]
    if missing:
        raise RewardConfigError(f"{where}: missing required param(s) {', '.join(missing)}")


def _check_values(name: str, params: Mapping[str, Any], where: str) -> None:
    check = _CHECKS.get(name)
    if check is None:
        return
    try:
        check(params)
    except (ValueError, TypeError) as exc:
        raise RewardConfigError(f"{where}: {exc}") from exc


def _normalize_spec(spec: Any, where: str) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise RewardConfigError(f"{where}: expected a mapping with 'name' or a string, got {spec!r}")
    extra = [k for k in spec if k not in _SPEC_KEYS]
    if extra:
        raise RewardConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, extra))}; a spec takes {', '.join(_SPEC_KEYS)} "
            "(function parameters go under 'params')"
        )
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise RewardConfigError(f"{where}: 'name' is required and must be a string")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise RewardConfigError(f"{where}: 'weight' must be a finite number, got {weight!r}")
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        raise RewardConfigError(f"{where}: 'params' must be a mapping, got {params!r}")
    return {"name": spec["name"], "weight": float(weight), "params": dict(params), "label": spec.get("label")}


def _bound(raw: Any, where: str) -> tuple[dict[str, Any], RewardFn]:
    """A spec (string, mapping or typed spec object) normalised, and the function it names, checked."""
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        raw = dataclasses.asdict(raw)
    spec = _normalize_spec(raw, where)
    fn = _resolve(spec["name"], where)
    _check_params(fn, spec["params"], f"{where} ({spec['name']})")
    _check_values(spec["name"], spec["params"], f"{where} ({spec['name']})")
    return spec, fn


def build_rewards(specs: Sequence[Any], where: str = "rewards") -> list[WeightedReward]:
    """Validate recipe specs and bind them to functions (see the module docstring for the format)."""
    if isinstance(specs, str | Mapping):
        specs = [specs]
    built: list[WeightedReward] = []
    for i, raw in enumerate(specs):
        here = f"{where}[{i}]"
        spec, fn = _bound(raw, here)
        label = spec["label"] or spec["name"]
        if any(r.name == label for r in built):
            raise RewardConfigError(f"{here}: reward {label!r} appears twice; give one a distinct 'label'")
        built.append(WeightedReward(label, fn, spec["weight"], spec["params"]))
    return built


def _checked(values: Any, n: int, name: str) -> Scores:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} values for {n} completions")
    out: Scores = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"reward {name!r} returned {type(v).__name__} {v!r}; expected float or None")
        else:
            out.append(float(v))
    return out


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def combine_scores(per_function: Sequence[Sequence[float | None]], weights: Sequence[float]) -> list[float]:
    """Weighted total of each row: ``Σ_k w_k r_k[i]`` over the functions that scored row ``i``.

    ``per_function[k][i]`` is function ``k``'s value for row ``i``; ``None`` or NaN means "not
    applicable". A row no function scored is NaN, not 0.0 (TRL's GRPOTrainer rule): a 0.0 would
    pull its group's mean toward 0 and hand the row an advantage it did not earn, while NaN is left
    out of the group's mean and std and its advantage is 0.
    """
    if len(per_function) != len(weights):
        raise ValueError(f"got {len(weights)} reward weights for {len(per_function)} reward functions")
    n = len(per_function[0]) if per_function else 0
    totals = []
    for i in range(n):
        scored = [(w, values[i]) for values, w in zip(per_function, weights, strict=True) if not _missing(values[i])]
        totals.append(sum(w * v for w, v in scored) if scored else math.nan)
    return totals


def score(
    rewards: Sequence[WeightedReward],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]] | None = None,
) -> tuple[list[float], dict[str, Scores], dict[str, int]]:
    """Run every reward on a batch; return (weighted totals, per-function scores, error counts).

    A total is NaN where every reward returned ``None`` (see :func:`combine_scores`)."""
    n = len(completions)
    columns = dict(columns or {})
    per_function: dict[str, Scores] = {}
    errors: dict[str, int] = {}
    for reward in rewards:
        errors[reward.name] = 0
        try:
            per_function[reward.name] = _checked(reward(prompts, completions, **columns), n, reward.name)
        except Exception as exc:
            summary = "".join(traceback.TracebackException.from_exception(exc, limit=-3).format())
            logger.warning("reward %r raised; scoring None for this batch\n%s", reward.name, summary)
            errors[reward.name] = 1
            per_function[reward.name] = [None] * n
    if not rewards:
        return [math.nan] * n, per_function, errors
    total = combine_scores([per_function[r.name] for r in rewards], [r.weight for r in rewards])
    return total, per_function, errors


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and unbiased std of the values that are not None / NaN (NaN when too few)."""
    seen = [v for v in values if not _missing(v)]
    if not seen:
        return math.nan, math.nan
    mean = math.fsum(seen) / len(seen)
    if len(seen) < 2:
        return mean, math.nan
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in seen) / (len(seen) - 1))


def reward_metrics(
    per_function: Mapping[str, Scores], errors: Mapping[str, int], totals: Sequence[float]
) -> dict[str, float]:
    """The reward scalars of one round, as TRL's GRPOTrainer computes them (NaN-ignoring):

    ``rewards/<name>/mean`` and ``/std`` over the rows the function scored, ``rewards/<name>/errors``
    (1 when it raised on this batch), and ``reward/mean`` / ``reward/std`` of the weighted totals over
    the scorable rows (TRL logs these two as ``reward`` / ``reward_std``). Stds are unbiased; a value
    is NaN when fewer rows than it needs were scored.
    """
    metrics: dict[str, float] = {}
    for name, values in per_function.items():
        metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = _mean_std(values)
        metrics[f"rewards/{name}/errors"] = float(errors.get(name, 0))
    metrics["reward/mean"], metrics["reward/std"] = _mean_std(totals)
    return metrics


def trl_reward_funcs(rewards: Sequence[WeightedReward]) -> tuple[list[WeightedReward], list[float]]:
    """``(reward_funcs, reward_weights)`` for TRL's ``GRPOTrainer`` / ``GRPOConfig``."""
    return list(rewards), [r.weight for r in rewards]
