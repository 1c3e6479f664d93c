"""Method labels -> method objects, from one table.

A label is `Name`, `Name(x%)` (x% = tau, the share of each earlier task a method keeps) or, for SEE,
`SEE(x%)-<variant>[-<variant>...]`: `MTL`, `AvgSTL`, `Non-rehearsal`, `RandSel(10%)`,
`KMeansSel(10%)`, `SSR`, `SSR(5%)`, `MoSEs`, `SETA`, `SEE(10%)`, `SEE(10%)-general-calibrated`.
Adding a method is one row in `METHODS`; its settings live in its own config section.

`SEE(x%)` is always the paper's recipe (no general negatives, greedy indicators, per-expert
indicator rows), whatever the library's defaults; each variant switches one thing on:
`pseudo` (negatives from the benchmark's general instruction set instead of earlier tasks),
`nonsemantic` / `semantic` (indicator type), `general` (general negatives from the benchmark's
general set), `builtin` (general negatives from the instructions that ship with seecl, what
`seecl learn` uses by default), `aLoRA` (activated-LoRA experts), `lasttoken` (with `aLoRA`: experts
invoked by the assistant header's last token alone), `calibrated` (per-expert P(pos)
thresholds calibrated on the experts' own queries; reuses the experts), `shared` (indicator rows
trained by the first expert and shared by the ensemble: plain LoRA experts, servable by vLLM).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from seecl.errors import ConfigError
from seecl.methods.base import Method, MethodContext

_LABEL = re.compile(r"^(?P<name>[A-Za-z-]+)(\((?P<tau>[0-9.]+)%\))?(-(?P<variant>[A-Za-z]+(-[A-Za-z]+)*))?$")

# The paper's SEE recipe, pinned so that a label keeps its meaning when library defaults change.
SEE_PAPER = ["see.general_negatives=0", "see.calibrate=false", "model.indicator_rows=per_expert"]
SEE_VARIANTS: dict[str, list[str]] = {
    "pseudo": ["see.negatives=pseudo"],
    "nonsemantic": ["model.indicator=nonsemantic"],
    "semantic": ["model.indicator=semantic"],
    "general": [],  # the count comes from the context (set by the benchmark), the pool too
    "builtin": [],  # the count comes from the context; the pool is the one that ships with seecl
    "aLoRA": ["adapter.kind=alora"],
    "lasttoken": ["adapter.alora_invocation=last_token"],  # with aLoRA: invoked by one token
    "calibrated": ["see.calibrate=true"],  # same experts as SEE(x%): only routing changes
    "shared": ["model.indicator_rows=shared"],
}


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table: where the class lives, how the label's tau is used, fixed arguments."""

    target: str  # "module:Class", imported when the method is built
    tau: Literal["none", "required", "optional"] = "none"
    default_tau: float | None = None
    kwargs: dict = field(default_factory=dict)
    build: Callable[[type, MethodContext, str, float | None, list[str]], Method] | None = None  # custom wiring


def _build_see(cls, ctx: MethodContext, label: str, tau: float | None, variants: list[str]) -> Method:
    overrides = SEE_PAPER + [f"see.tau={tau}"] + [o for v in variants for o in SEE_VARIANTS[v]]
    if {"general", "builtin"} <= set(variants):
        raise ConfigError(f"{label!r}: general negatives come from the benchmark's set or the built-in one, not both")
    if "lasttoken" in variants and "aLoRA" not in variants:
        raise ConfigError(f"{label!r}: `lasttoken` sets how aLoRA experts are invoked; add `aLoRA`")
    if {"general", "builtin"} & set(variants):
        overrides.append(f"see.general_negatives={ctx.general_negatives}")
    if {"general", "pseudo"} & set(variants):
        if ctx.general is None:
            raise ConfigError(f"{label!r} needs a general instruction set (the benchmark's OOD file)")
        overrides.append(f"see.general_negatives_file={ctx.general.source or 'general'}")
        return cls(ctx, label, overrides, ctx.general)
    return cls(ctx, label, overrides, None)


METHODS: dict[str, MethodSpec] = {
    "MTL": MethodSpec("seecl.methods.mtl:MultiTask"),
    "AvgSTL": MethodSpec("seecl.methods.stl:SingleTask"),
    "Non-rehearsal": MethodSpec("seecl.methods.replay:Replay", kwargs={"tau": 0.0, "selection": "none"}),
    "RandSel": MethodSpec("seecl.methods.replay:Replay", "required", kwargs={"selection": "random"}),
    "KMeansSel": MethodSpec("seecl.methods.replay:Replay", "required", kwargs={"selection": "kmeans"}),
    "SSR": MethodSpec("seecl.methods.ssr:SelfSynthesizedRehearsal", "optional", default_tau=0.1),
    "MoSEs": MethodSpec("seecl.methods.moses:MoSEs"),
    "SETA": MethodSpec("seecl.methods.seta:SETA"),
    "SEE": MethodSpec("seecl.methods.see:SeeMethod", "required", build=_build_see),
}


def parse_label(label: str) -> tuple[str, float | None, str | None]:
    """`SEE(10%)-aLoRA` -> ("SEE", 0.1, "aLoRA"), checked against the table."""
    match = _LABEL.match(label)
    if not match or match["name"] not in METHODS:
        raise ConfigError(f"unknown method {label!r}; known: {known()}")
    name, spec = match["name"], METHODS[match["name"]]
    try:
        tau = float(match["tau"]) / 100 if match["tau"] else None
    except ValueError:
        raise ConfigError(f"{label!r}: {match['tau']!r} is not a number of percent") from None
    if tau is not None and not 0 <= tau <= 1:  # refused here, before a benchmark makes any folder
        raise ConfigError(f"{label!r}: the share must be between 0% and 100%")
    if spec.tau == "none" and tau is not None:
        raise ConfigError(f"{label!r}: {name} takes no (x%)")
    if spec.tau == "required" and tau is None:
        raise ConfigError(f"{label!r}: {name} needs a share, e.g. {name}(10%)")
    if match["variant"] is not None:
        if spec.build is not _build_see:
            raise ConfigError(f"{label!r}: only SEE has variants")
        see_variants(match["variant"])
    return name, tau, match["variant"]


def see_variants(variant: str | None) -> list[str]:
    """`general-calibrated` -> ["general", "calibrated"], each a known SEE variant, none twice."""
    variants = variant.split("-") if variant else []
    unknown = [v for v in variants if v not in SEE_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown SEE variant {unknown[0]!r}; known: {sorted(SEE_VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ConfigError(f"SEE variant repeated in {variant!r}")
    return variants


def build_method(label: str, ctx: MethodContext) -> Method:
    name, tau, variant = parse_label(label)
    spec = METHODS[name]
    module, _, attribute = spec.target.partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    if spec.build is not None:
        return spec.build(cls, ctx, label, tau, see_variants(variant))
    kwargs = dict(spec.kwargs)
    if spec.tau != "none":
        kwargs["tau"] = spec.default_tau if tau is None else tau
    return cls(ctx, label, **kwargs)


def known() -> str:
    shares = {"required": "(x%)", "optional": "[(x%)]", "none": ""}
    return ", ".join(f"{name}{shares[spec.tau]}" for name, spec in METHODS.items()) + ", SEE(x%)-<variant>"
