"""Method labels -> method objects: `MTL`, `AvgSTL`, `Non-rehearsal`, `RandSel(10%)`,
`KMeansSel(10%)`, `SSR`, `SSR(5%)`, `MoSEs`, `SETA`, `SEE(10%)` and SEE variants `SEE(10%)-<variant>`.

SEE variants (each one config switch): `pseudo` (negatives from the general instruction set
instead of earlier tasks), `nonsemantic` / `semantic` (indicator type), `general` (general
negatives for every expert), `aLoRA` (activated-LoRA experts), `calibrated` (per-expert
P(pos) thresholds calibrated on the experts' own queries; reuses the SEE(x%) experts), `shared`
(indicator rows trained by the first expert and shared by the ensemble: plain LoRA experts).
Variants combine in a label, `SEE(10%)-general-calibrated`, each switch applied once.
"""

from __future__ import annotations

import re

from seecl.errors import ConfigError
from seecl.methods.base import Method, MethodContext

_LABEL = re.compile(r"^(?P<name>[A-Za-z-]+)(\((?P<tau>[0-9.]+)%\))?(-(?P<variant>[A-Za-z]+(-[A-Za-z]+)*))?$")

SEE_VARIANTS = {
    "pseudo": ["see.negatives=pseudo"],
    "nonsemantic": ["model.indicator=nonsemantic"],
    "semantic": ["model.indicator=semantic"],
    "general": [],  # see.general_negatives comes from the context (count set by the benchmark)
    "aLoRA": ["adapter.kind=alora"],
    "calibrated": ["see.calibrate=true"],  # same experts as SEE(x%): only routing changes
    "shared": ["model.indicator_rows=shared"],  # plain LoRA experts over rows the first expert trained
}


def parse_label(label: str) -> tuple[str, float | None, str | None]:
    match = _LABEL.match(label)
    if not match:
        raise ConfigError(f"cannot parse method label {label!r}")
    tau = float(match["tau"]) / 100 if match["tau"] else None
    return match["name"], tau, match["variant"]


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
    from seecl.methods.mtl import MultiTask
    from seecl.methods.replay import Replay
    from seecl.methods.see import SeeMethod
    from seecl.methods.ssr import SelfSynthesizedRehearsal
    from seecl.methods.stl import SingleTask

    name, tau, variant = parse_label(label)
    if variant is not None and name != "SEE":
        raise ConfigError(f"{label!r}: only SEE has variants")
    if name == "MTL" and tau is None:
        return MultiTask(ctx, label)
    if name == "AvgSTL" and tau is None:
        return SingleTask(ctx, label)
    if name == "Non-rehearsal" and tau is None:
        return Replay(ctx, label, 0.0, "none")
    if name == "RandSel" and tau is not None:
        return Replay(ctx, label, tau, "random")
    if name == "KMeansSel" and tau is not None:
        return Replay(ctx, label, tau, "kmeans")
    if name == "SSR":
        return SelfSynthesizedRehearsal(ctx, label, 0.1 if tau is None else tau)
    if name == "MoSEs" and tau is None:
        from seecl.methods.moses import MoSEs

        return MoSEs(ctx, label)
    if name == "SETA" and tau is None:
        from seecl.methods.seta import SETA

        return SETA(ctx, label)
    if name == "SEE" and tau is not None:
        variants = see_variants(variant)
        overrides = [f"see.tau={tau}"] + [o for v in variants for o in SEE_VARIANTS[v]]
        needs_general = bool({"pseudo", "general"} & set(variants))
        if needs_general and ctx.general is None:
            raise ConfigError(f"{label!r} needs a general instruction set (general negatives file)")
        if "general" in variants:
            overrides.append(f"see.general_negatives={ctx.extra.get('general_negatives', 10)}")
        if needs_general:
            overrides.append(f"see.general_negatives_file={ctx.general.source or 'general'}")
        return SeeMethod(ctx, label, overrides)
    raise ConfigError(
        f"unknown method {label!r}; known: MTL, AvgSTL, Non-rehearsal, RandSel(x%), "
        "KMeansSel(x%), SSR, MoSEs, SETA, SEE(x%) and SEE(x%)-<variant>"
    )
