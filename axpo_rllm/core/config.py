"""The AXPO hyper-parameters (one dataclass, the paper's defaults) and the one unknown-key check
every config dataclass of the package goes through."""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Literal, Mapping, TypeVar

__all__ = ["AXPOConfig", "Ranking", "Target", "SourceTail", "Streaming", "Speculation", "dataclass_from_mapping",
           "std_normalization", "VERL_STD_KEY", "AXPO_STD_KEY"]

Ranking = Literal["uncertainty", "random", "confidence"]
Target = Literal["tool", "no_tool"]
SourceTail = Literal["mask", "keep"]
Streaming = Literal["off", "exact", "greedy"]
Speculation = Literal["off", "group", "rollout"]

D = TypeVar("D")


def dataclass_from_mapping(cls: type[D], node: Mapping[str, Any] | None, what: str, **extra: Any) -> D:
    """``cls(**node, **extra)`` where a key ``cls`` does not declare is an error naming it and the
    known keys (a typo in a yaml or an override fails at load time, not mid-run)."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = dict(node.items()) if node is not None else {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; known keys are {sorted(known)}")
    return cls(**{**data, **extra})


# ---------------------------------------------------------------------------------------------
# Hyper-parameters (one dataclass, the paper's defaults). Every ablation of docs/algorithm.md §8 is one
# field here; GRPO is ``enable=False``.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AXPOConfig:
    enable: bool = True
    """False: plain GRPO (no planning, no resampling)."""
    r: float = 0.25
    """Extra-sample ratio: E = floor(r·B·N)."""
    k: int = 4
    """Continuations per selected prefix (all K or none)."""
    ranking: Ranking = "uncertainty"
    """``uncertainty`` (least confident first), ``random`` (ablation), ``confidence`` (most confident first)."""
    prefix_fix: bool = True
    """False = 'w/o prefix fix': the budget buys fresh rollouts from the question (empty prefix)."""
    resample_target: Target = "tool"
    """``no_tool`` = the 'no-tool resampling' ablation: prefixes of non-tool rollouts, cut where they answer."""
    prefix_credit: bool = True
    """True: a credited source's reward becomes r_prefix = the best reward of its continuations (1 if
    any is correct for 0/1 rewards; the best F1 for graded ones). False = 'w/o prefix credit': the
    source keeps its own reward and full-trajectory advantage."""
    separate_groups: bool = True
    """False = 'w/o separate advantage group': continuations are normalised inside q's group."""
    source_tail: SourceTail = "mask"
    """What happens to a credited source's own tokens after the prefix: masked, or kept with
    the advantage they had before the reward replacement."""
    norm_by_std: bool = True
    """Divide by the group std (GRPO) or only centre (Dr.GRPO). In a run's config this is verl's
    ``algorithm.norm_adv_by_std_in_grpo`` (:func:`std_normalization`, applied by :meth:`from_algorithm`);
    ``algorithm.axpo.norm_by_std`` is an alias that may only agree with it."""
    std_unbiased: bool = True
    """Bessel-corrected std, as verl's GRPO (``torch.std``)."""
    epsilon: float = 1e-6
    max_failed_share: float = 0.05
    """The failure policy's bound (:mod:`axpo_rllm.core.failures`): a step in which a larger share
    of rollouts failed raises instead of training."""
    seed: int = 0
    """Seeds the ``random`` ranking (combined with the step number)."""
    streaming: Streaming = "exact"
    """When phase 3 may start (:mod:`axpo_rllm.core.streaming`). ``exact``: each prefix as soon as
    its selection is certain whatever the rest of the batch brings; the plan is
    ``plan_resampling``'s. ``off``: after the whole batch (the plain barrier; same plan).
    ``greedy``: first come, breadth-first: within a round questions take slots in the order their
    groups arrive instead of by rank key (a different plan; ``plan_first_come``)."""
    speculation: Speculation = "off"
    """With ``streaming: exact``, also start prefixes that are *likely* selected before they are
    certain (:mod:`axpo_rllm.core.streaming`, "Speculation"); the plan and the tokens stay the batch
    planner's, a speculative start the plan does not take is cancelled (extra compute, never an
    extra sample). ``group``: the plan of the questions complete so far; ``rollout``: also the graded
    sources of questions still running that can still trigger. In force only with ``streaming: exact``
    and a known rank order (``random`` keys depend on every earlier question): inert otherwise."""

    def __post_init__(self) -> None:
        # YAML 1.1 (omegaconf, hydra's command line) reads a bare `off` as false: `streaming=off` and
        # `speculation=off` from a config file or an override mean the string.
        for name in ("streaming", "speculation"):
            if getattr(self, name) is False:
                object.__setattr__(self, name, "off")
        checks = [
            (0.0 <= self.r <= 16.0, f"r must be in [0, 16], got {self.r!r}"),
            (isinstance(self.k, int) and self.k >= 1, f"k must be an int >= 1, got {self.k!r}"),
            (self.ranking in ("uncertainty", "random", "confidence"),
             f"ranking must be uncertainty|random|confidence, got {self.ranking!r}"),
            (self.resample_target in ("tool", "no_tool"), f"resample_target must be tool|no_tool, got {self.resample_target!r}"),
            (self.source_tail in ("mask", "keep"), f"source_tail must be mask|keep, got {self.source_tail!r}"),
            (self.streaming in ("off", "exact", "greedy"), f"streaming must be off|exact|greedy, got {self.streaming!r}"),
            (self.speculation in ("off", "group", "rollout"), f"speculation must be off|group|rollout, got {self.speculation!r}"),
            (self.epsilon >= 0.0, f"epsilon must be >= 0, got {self.epsilon!r}"),
            (0.0 <= self.max_failed_share <= 1.0, f"max_failed_share must be in [0, 1], got {self.max_failed_share!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"AXPOConfig: {message}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "AXPOConfig":
        """Build from a dict / omegaconf node (e.g. verl's ``algorithm.axpo``); unknown keys are an error."""
        return dataclass_from_mapping(cls, cfg, "AXPOConfig")

    @classmethod
    def from_algorithm(cls, algorithm: Any) -> "AXPOConfig":
        """Build from verl's whole ``algorithm`` section: ``algorithm.axpo`` with ``norm_by_std``
        taken from verl's key (:func:`std_normalization`), so that AXPO's groups and verl's GRPO
        normalise the same way."""
        node = dict(_get(algorithm, "axpo", None) or {})
        node["norm_by_std"] = std_normalization(algorithm)
        return cls.from_mapping(node)


VERL_STD_KEY = "algorithm.norm_adv_by_std_in_grpo"
AXPO_STD_KEY = "algorithm.axpo.norm_by_std"


def _get(node: Any, key: str, default: Any) -> Any:
    """``node[key]`` for a dict, an omegaconf node or verl's ``AlgoConfig``; an attribute otherwise
    (rllm's algorithm config)."""
    if node is None:
        return default
    getter = getattr(node, "get", None)
    return getter(key, default) if callable(getter) else getattr(node, key, default)


def std_normalization(algorithm: Any) -> bool:
    """Whether group advantages are divided by the group std, from verl's ``algorithm`` section.

    The one source of truth is verl's ``norm_adv_by_std_in_grpo`` (what verl's ``grpo`` reads, and
    what verl users set for Dr. GRPO); absent, the alias ``axpo.norm_by_std``; absent too, verl's
    default (True). Both given with different values is an error naming both keys.
    """
    verl = _get(algorithm, "norm_adv_by_std_in_grpo", None)
    alias = _get(_get(algorithm, "axpo", None), "norm_by_std", None)
    if verl is not None and alias is not None and bool(verl) != bool(alias):
        raise ValueError(f"{VERL_STD_KEY}={verl!r} and {AXPO_STD_KEY}={alias!r} disagree: set only "
                         f"{VERL_STD_KEY} (it switches std normalisation for GRPO and AXPO alike)")
    if verl is not None:
        return bool(verl)
    return bool(alias) if alias is not None else True
