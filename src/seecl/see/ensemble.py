"""SEE, the Sequential Ensemble of Experts (docs/design.md §1), as an ensemble directory.

`SeeEnsemble` owns learning one expert per task (the reconstruction of see/reconstruction.py,
one fresh LoRA on the frozen base, published through see/store.py) and answering queries through
a routing backend (the fast engine or the reference router); per-expert thresholds are calibrated
on each expert's own stored queries. The training loop, the on-disk format and the routing rule
live in training.py, see/store.py and serving/routing.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from seecl import training
from seecl.adapters import (
    add_expert,
    cache_material,
    invocation_tokens,
    load_expert,
    save_expert,
    trainable_parameters,
)
from seecl.cache import AdapterCache, cache_key
from seecl.config import RunConfig, load_config, save_config, to_dict
from seecl.data.general import load_general
from seecl.data.prompts import PromptFormatter
from seecl.data.task import Task
from seecl.errors import StoreError
from seecl.model.base import Base, load_base
from seecl.publish import write_json_atomic
from seecl.see.reconstruction import build_memory, reconstruct
from seecl.see.shared_rows import apply_rows, take_rows
from seecl.see.store import ADAPTER_FILES, EnsembleStore, validate_expert_name
from seecl.serving.engine import RoutingEngine
from seecl.serving.reference import SequentialRouter
from seecl.serving.routing import Answer, Budget, Check, OnToken, Query, Route, Thresholds
from seecl.training import run_fingerprint


class SeeEnsemble:
    """A SEE ensemble on disk: `learn` appends an expert, `ask` routes queries."""

    @classmethod
    def open(
        cls, root: str | Path, overrides: list[str] | None = None, path: str | None = None, preset: str | None = None
    ) -> SeeEnsemble:
        """An ensemble with its stored base-model settings; `overrides` change the rest.

        A new directory takes the model settings from the overrides (or the defaults).
        """
        store = EnsembleStore(root)
        defaults = {}
        if store.exists():
            stored = store.manifest()["model"]
            defaults = {"model": {k: stored[k] for k in ("name", "indicator", "system_prompt") if k in stored}}
            defaults["model"]["indicator_rows"] = stored.get("indicator_rows", "per_expert")
        return cls(root, load_config(RunConfig, path, overrides or [], preset, defaults))

    def __init__(self, root: str | Path, config: RunConfig | None = None):
        self.store = EnsembleStore(root)
        self.config = config or RunConfig()
        self._base: Base | None = None
        self._model = None
        self._loaded: list[str] = []
        self._engine = None
        self._rows_digest: str | None = None  # the shared indicator rows written into the base, if any
        # Route through the first `visible` experts only (None: all). A continual run that is
        # scored again after every expert exists sees each stage's ensemble as it was then.
        self.visible: int | None = None
        if self.store.exists():
            manifest = self.store.manifest()
            wanted = self.config.model
            if config is not None and (
                manifest["model"]["name"] != wanted.name or manifest["indicators"]["kind"] != wanted.indicator
            ):
                raise StoreError(
                    f"{self.store.root} was built on {manifest['model']['name']!r} with "
                    f"{manifest['indicators']['kind']!r} indicators; got model.name={wanted.name!r}, "
                    f"model.indicator={wanted.indicator!r}"
                )
            # ensembles from before shared rows existed have per-expert rows
            stored = {
                "indicator_rows": "per_expert",
                **manifest["model"],
                "device": wanted.device,
                "dtype": wanted.dtype,
            }
            self.config.model = type(wanted)(**stored)

    @property
    def base(self) -> Base:
        if self._base is None:
            self._base = load_base(self.config.model)
            self.store.create(
                to_dict(self.config.model),
                self._base.indicators.to_dict(),
                len(self._base.tokenizer),
                self._base.tokenizer,
            )
            self.store.clean_staging()
            self._apply_shared_rows()
        return self._base

    def _apply_shared_rows(self) -> None:
        """Write the ensemble's shared indicator rows into the base, once they exist (a reader that
        opened the ensemble before its first expert was committed gets them with that expert)."""
        shared = self.store.shared_rows()
        if shared is not None and shared[2] != self._rows_digest:
            apply_rows(self._base.model, shared[0], shared[1])
            self._rows_digest = shared[2]

    def formatter(self, max_length: int | None = None) -> PromptFormatter:
        return PromptFormatter(
            self.base.tokenizer,
            self.base.indicators,
            self.config.model.system_prompt,
            max_length or self.config.train.max_length,
        )

    @property
    def model(self):
        """The base with every published expert loaded (as PEFT adapters named after the experts)."""
        model = self._model if self._model is not None else self.base.model
        names = self.store.expert_names()
        if self._rows_digest is None and any(name not in self._loaded for name in names):
            self._apply_shared_rows()
        for name in names:
            if name not in self._loaded:
                model = load_expert(model, name, self.store.expert_dir(name))
                self._loaded.append(name)
        self._model = model
        return model

    def experts(self) -> list[str]:
        """The experts routing asks, oldest first."""
        names = self.store.expert_names() if self.store.exists() else []
        return names if self.visible is None else names[: self.visible]

    def learn(
        self, task: Task, name: str | None = None, general: Task | None = None, cache: AdapterCache | None = None
    ) -> dict:
        """Train and publish the expert for `task`; returns its manifest record.

        With a cache, an expert trained before on exactly the same reconstruction and settings
        (SEE's first expert is the same for every tau) is copied instead of retrained.
        """
        # The name becomes paths under the ensemble: checked before anything is loaded or written.
        name = validate_expert_name(name or task.name)
        # Under `accelerate launch` or torchrun every process trains and one, rank 0, publishes. The
        # rank comes from the launcher's environment: accelerate's state is made by the training.
        main = int(os.environ.get("RANK", "0")) == 0
        with self.store.learning(f"`seecl learn` of expert {name!r}") if main else contextlib.nullcontext():
            return self._learn(task, name, general, cache, main)

    def _learn(self, task: Task, name: str, general: Task | None, cache: AdapterCache | None, main: bool) -> dict:
        cfg = self.config
        _ = self.base  # creates the ensemble directory on first use
        before = self.store.expert_names()
        if name in before:
            raise StoreError(f"expert {name!r} already exists in {self.store.root}")
        formatter = self.formatter()
        memories = self.store.memories()
        if general is None and (cfg.see.general_negatives or cfg.see.negatives == "pseudo"):
            general = load_general(cfg.see.general_negatives_file)
        rec = reconstruct(
            task,
            memories,
            cfg.see.tau,
            cfg.see.seed,
            general.instances if general else (),
            cfg.see.general_negatives,
            cfg.see.negatives == "pseudo",
            general.name if general else "general",
        )
        examples = rec.examples(formatter)
        adapter, shared_digest, first_shared = self._adapter_settings()
        key = cache_key(
            kind="see-expert",
            model=cfg.model.name,
            system=cfg.model.system_prompt,
            indicators=self.base.indicators.to_dict(),
            adapter=cache_material(adapter),
            run=run_fingerprint(examples, cfg.train),
            **({"shared_rows": shared_digest} if shared_digest else {}),
        )
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            trained = cache.meta(key)
            metrics, losses, parameters = trained["metrics"], trained["losses"], trained["trainable_parameters"]

            def save(directory: Path) -> None:
                for file in ADAPTER_FILES:
                    shutil.copy2(cached / file, directory / file)
        else:
            invocation = invocation_tokens(adapter, formatter.invocation_ids())
            model = add_expert(self.model, name, adapter, self.base.indicators, cfg.train.seed, invocation)
            self._model = model
            self._engine = None
            work = self.store.work_dir(name)
            result = training.train(
                model,
                examples,
                cfg.train,
                self.base.tokenizer.pad_token_id,
                checkpoint_dir=work,
                desc=f"expert {name}",
            )
            # A finished training needs no checkpoint: nothing of it stays behind.
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                work.parent.rmdir()  # only when no other expert's checkpoint is in it
            metrics = {k: v for k, v in result.to_dict().items() if k != "losses"}
            losses, parameters = result.losses, trainable_parameters(model, name)

            def save(directory: Path) -> None:
                save_expert(model, name, directory)

            if cache is not None:
                cache.put(key, save, {"metrics": metrics, "losses": losses, "trainable_parameters": parameters})
            self._loaded.append(name)
        shared_rows = None
        if first_shared:  # the rows leave the first expert's adapter and become the ensemble's
            staged = Path(tempfile.mkdtemp(prefix=f".rows-{os.getpid()}-", dir=self.store.root))
            save(staged)
            shared_rows = take_rows(staged)

            def save(directory: Path) -> None:
                for file in ADAPTER_FILES:
                    shutil.copy2(staged / file, directory / file)

        # What this expert was trained with: a later expert of a shared-rows ensemble trains no rows.
        trained_with = dataclasses.replace(cfg, adapter=adapter)
        memory = build_memory(task, cfg.see.memory_tau, cfg.see.seed)
        counts = {source: len(ids) for source, ids in rec.negative_ids().items()}
        record = {
            "n_positives": len(rec.positives),
            "n_negatives": counts,
            "tau": cfg.see.tau,
            "data_fingerprint": task.fingerprint(),
            "adapter_kind": cfg.adapter.kind,
            "trainable_parameters": parameters,
            "metrics": metrics,
            "config": to_dict(trained_with),
            **({"shared_rows": shared_digest} if shared_digest else {}),
            "from_cache": cached is not None,
            "cache_key": key,
        }
        meta = {**record, "negative_ids": rec.negative_ids(), "losses": losses, "data_source": task.source}
        if general is not None and rec.negative_ids().get(general.name):
            meta["general_pool"] = {"source": general.source, "fingerprint": general.fingerprint()}

        def write(directory: Path) -> None:
            save(directory)
            save_config(trained_with, directory / "config.yaml")

        from accelerate import PartialState

        if main:
            self.store.commit_expert(name, write, meta, memory, record, shared_rows, after=before)
        PartialState().wait_for_everyone()
        if shared_rows is not None:
            shutil.rmtree(staged, ignore_errors=True)
            if name in self._loaded:  # the in-memory expert (the only one) still carries its own rows
                self._base.model = self._model.unload()
                self._model, self._loaded = None, []
            apply_rows(self.base.model, *shared_rows)
            self._engine = None
        return record

    def _adapter_settings(self):
        """(adapter settings, digest of the shared rows trained over or None, whether this expert
        trains the rows the ensemble will share)."""
        cfg = self.config
        if cfg.model.indicator_rows != "shared" or not self.base.indicators.trainable_token_ids:
            return cfg.adapter, None, False
        shared = self.store.shared_rows()
        if shared is None:
            return dataclasses.replace(cfg.adapter, train_indicator_rows=True), None, True
        return dataclasses.replace(cfg.adapter, train_indicator_rows=False), shared[2], False

    def thresholds(self) -> Thresholds:
        """What routing compares P(pos)/(P(pos)+P(neg)) with: see.calibrate, see.threshold or None."""
        return self.calibrated_thresholds() if self.config.see.calibrate else self.config.see.threshold

    def calibrated_thresholds(self) -> dict[str, float]:
        """Per-expert thresholds from each expert's own stored queries (computed once, kept in
        calibration.json next to the manifest, keyed by expert, quantile and margin)."""
        see = self.config.see
        path = self.store.root / "calibration.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        setting = f"q={see.calibration_quantile},margin={see.calibration_margin}"
        thresholds = saved.get(setting, {})
        missing = [name for name in self.experts() if name not in thresholds]
        for name in missing:
            queries = [item.query for item in self.store.memory(name).items]
            checks = [
                route.checks[0]
                for route in RoutingEngine(
                    self.model, self.formatter(), [name], None, self.config.generate.batch_size, 0
                ).route(queries)
            ]
            thresholds[name] = calibrate_threshold(checks, see.calibration_quantile, see.calibration_margin)
        if missing:
            write_json_atomic(path, {**saved, setting: thresholds})
        return {name: thresholds[name] for name in self.experts()}

    def router(self, threshold: Thresholds = None) -> SequentialRouter:
        threshold = self.thresholds() if threshold is None else threshold
        return SequentialRouter(
            self.model, self.formatter(), self.experts(), threshold, self.config.generate.batch_size
        )

    def engine(self) -> RoutingEngine:
        """The fast engine over the current experts (kept while they do not change: its prefix cache)."""
        gen = self.config.generate
        experts = self.experts()
        if self._engine is None or self._engine.experts() != experts:
            self._engine = RoutingEngine(
                self.model,
                self.formatter(),
                experts,
                self.thresholds(),
                gen.batch_size,
                gen.prefix_cache_tokens,
                gen.prefix_block,
                gen.prefill_tokens,
                gen.check_group,
            )
        return self._engine

    def backend(self) -> RoutingEngine | SequentialRouter:
        """What answers queries over the current experts: the fast engine or the reference router."""
        return self.engine() if self.config.generate.engine == "fast" else self.router()

    def ask(
        self, queries: Sequence[str | Query], max_new_tokens: Budget | None = None, on_token: OnToken | None = None
    ) -> list[Answer]:
        budget = self.config.generate.max_new_tokens if max_new_tokens is None else max_new_tokens
        return self.backend().ask(list(queries), budget, on_token)

    def route(self, queries: Sequence[str | Query]) -> list[Route]:
        return self.backend().route(list(queries))


def calibrate_threshold(checks: Sequence[Check], quantile: float, margin: float) -> float:
    """Threshold on P(pos)/(P(pos)+P(neg)) from an expert's checks of its own queries.

    Takes the `quantile` of their log-odds log(P(pos)/P(neg)), subtracts `margin` and maps back;
    kept within [0.5, 0.999] so that a calibrated expert never claims less than the greedy rule
    would on a clear `<<pos>>`, and never demands certainty.
    """
    odds = sorted(math.log(max(c.p_pos, 1e-30)) - math.log(max(c.p_neg, 1e-30)) for c in checks)
    if not odds:
        return 0.5
    position = min(len(odds) - 1, int(quantile * len(odds)))
    threshold = 1.0 / (1.0 + math.exp(-(odds[position] - margin)))
    return min(0.999, max(0.5, threshold))
