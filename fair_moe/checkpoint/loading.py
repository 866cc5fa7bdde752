"""Loading what a run needs through transformers: config, model, tokenizer or image processor.

A user's model code (``auto_map`` modeling files) only runs with ``trust_remote_code=True``, which only the
``--trust-remote-code`` flag sets.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from fair_moe.core.errors import FairMoeError
from fair_moe.core.lazy import lazy_module

torch = lazy_module("torch")


def load_config(name: str, trust_remote_code: bool = False):
    """The model's config from a checkpoint folder, a Hub id, or a bare ``config.json`` (for ``--dry-run``)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if name.endswith(".json") and Path(name).is_file():
        data = json.loads(Path(name).read_text())
        if data.get("model_type") not in CONFIG_MAPPING:
            raise FairMoeError(f"--model {name}: model_type {data.get('model_type')!r} is unknown to transformers")
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise FairMoeError(f"--model {name} does not exist: pass a checkpoint folder or a Hub id (owner/name)")
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise FairMoeError(f"--model {name} has no config.json: pass a Hugging Face checkpoint folder")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise FairMoeError(f"cannot load --model {name!r}: {err.__class__.__name__}: {str(err).splitlines()[0]}"
                           + (" (pass --trust-remote-code if you trust this repository's code)"
                              if "trust_remote_code" in str(err) else "")) from err


HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab*",
             "LICEN[CS]E*", "NOTICE*", "USE_POLICY*", "README.md"]


def local_checkpoint(name: str, trust_remote_code: bool = False) -> Path | None:
    """The folder a run reads the model from: ``name`` itself when it is a local folder, else the Hub snapshot
    of ``name`` (downloaded, or from the cache; only the files a checkpoint needs, Python files only with
    ``trust_remote_code``), so that Hub models are streamed and placed exactly like local ones. None for a bare
    config file."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return None
    from huggingface_hub import snapshot_download

    patterns = HUB_FILES + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as err:  # huggingface_hub raises network, auth, offline and not-found errors alike
        raise FairMoeError(f"cannot fetch --model {name!r} from the Hub ({err.__class__.__name__}: "
                           f"{str(err).splitlines()[0]}); check the id, your network and HF_TOKEN, or pass a local "
                           "checkpoint folder") from err


def resolve_device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FairMoeError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    return torch.device(name)


def checkpoint_dtype(config):
    """The dtype the checkpoint's weights are stored in (float32 when the config does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def resolve_dtype(name: str, config, device):
    """``--dtype auto`` is the checkpoint's dtype, except float32 for half-precision checkpoints on CPU."""
    if name != "auto":
        return getattr(torch, name)
    dtype = checkpoint_dtype(config)
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def parse_max_memory(text: str | None) -> dict | None:
    """'cpu=8GiB,0=20GiB' → {"cpu": "8GiB", 0: "20GiB"}."""
    if not text:
        return None
    result = {}
    for part in text.split(","):
        if "=" not in part:
            raise FairMoeError(f"--max-memory {text!r}: write DEVICE=SIZE pairs, e.g. cpu=8GiB,0=20GiB")
        device, size = (x.strip() for x in part.split("=", 1))
        result[int(device) if device.isdigit() else device] = size
    return result


def load_model(name: str, auto_class: str, dtype, device, placement: dict | None = None,
               trust_remote_code: bool = False, quantized=None):
    """The model through ``transformers.<auto_class>``, in eval mode, on ``device`` unless ``placement`` (accelerate
    ``device_map`` / ``max_memory`` / ``offload_folder``) places it. A quantized checkpoint (``quantized``, a
    ``QuantizedSource``) is dequantised to ``dtype`` while loading, whatever kernels the machine has."""
    import contextlib

    import transformers
    from safetensors import SafetensorError

    extra = quantized.load_kwargs() if quantized is not None else {}
    with warnings.catch_warnings(), (quantized.loading() if quantized is not None else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        try:
            model = getattr(transformers, auto_class).from_pretrained(
                name, dtype=dtype, trust_remote_code=trust_remote_code, **(placement or {}), **extra)
        except (OSError, ValueError) as err:
            raise FairMoeError(f"cannot load the weights of --model {name}: {str(err).splitlines()[0]}") from err
        except SafetensorError as err:
            raise FairMoeError(f"cannot load the weights of --model {name}: a weight file is truncated or damaged "
                               f"({err}); download or save the checkpoint again") from err
    if not placement:
        model = model.to(device)
    return model.eval()


def load_processor(name: str, processor_class: str, trust_remote_code: bool = False):
    """The tokenizer or image processor saved with the model."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return getattr(transformers, processor_class).from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise FairMoeError(f"cannot load the {processor_class} of --model {name}: "
                               f"{str(err).splitlines()[0]}") from err
