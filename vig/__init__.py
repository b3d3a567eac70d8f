"""ViG, ViG-H and Vim vision backbones, registered with timm on import (and, when
open_clip is installed, as open_clip image towers: see ``vig.clip_towers``).

>>> import timm, vig
>>> model = timm.create_model("vig_small", num_classes=0)
"""
import importlib.util

from .cost import model_cost
from .official import load_official_state_dict
from .vig import BiGLAMixer, HierViG, ViG
from .vim import BiMambaMixer, Vim

MODEL_NAMES = ("vig_tiny", "vig_small", "vig_base", "vig_h_tiny", "vig_h_small", "vig_h_base",
               "vim_tiny", "vim_small", "vim_base")

if importlib.util.find_spec("open_clip") is not None:
    from .clip_towers import register_open_clip_configs

    OPEN_CLIP_CONFIGS = tuple(register_open_clip_configs())
else:
    OPEN_CLIP_CONFIGS = ()

__all__ = ["MODEL_NAMES", "OPEN_CLIP_CONFIGS", "ViG", "HierViG", "Vim", "BiGLAMixer", "BiMambaMixer",
           "load_official_state_dict", "model_cost"]
__version__ = "0.1.0"
