"""Zero-shot classification of open_clip models (CLIP / CustomTextCLIP, our timm towers included) on labelled shards.

    python -m eval.zeroshot --model local-dir:runs/clip_vig_b/export \
        --shards /data/shards/imagenet/val --class-names imagenet --templates openai
    python -m eval.zeroshot --model ViG-T-16-MiniLM-L6 --image-size 64 \
        --pretrained runs/demo_clip_vig_t/export/open_clip_model.safetensors \
        --shards demo_data/val --templates fashion_mnist_heldout

Each class gets the normalised mean of its normalised text embeddings over all templates (open_clip's
``build_zero_shot_classifier``); an image is classified by ``100 * normalised image feature @ classifier``
(open_clip's fixed evaluation scale) and top-1 / top-5 are reported in percent (top-5 is top-min(5, C)).
Images get open_clip's evaluation transform: bicubic resize of the short side to the model's input size and a
center crop, normalised with the model's mean and std.

Class names: ``imagenet`` (open_clip's 1,000), a text file with one name per line (line i names label i), or by
default the ``class_names`` of the shards' ``dataset.json``. Templates: ``openai`` (80), ``simple`` (7), a bundled
set from ``eval/prompts`` (``fashion_mnist_heldout``, ``digits_heldout``), ``dataset`` (the caption templates of
the shards' ``dataset.json``), or a text file with one template per line containing ``{}`` (or ``{c}``) once.
If a template equals one the shards' captions were generated from, a warning names it: zero-shot accuracy on
captions made from the very templates it is prompted with measures memorisation as much as transfer.

Library use (the CLIP trainer's periodic evaluation): :func:`zero_shot`, or :func:`build_classifier` once and
:func:`evaluate` with any loader of ``(images, labels)``. See ``docs/zeroshot.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
from open_clip import zero_shot_metadata
from torch import nn

import vig  # noqa: F401  (registers our timm towers, and the ViG/Vim open_clip configs, before models are made)
from eval.accuracy import AutocastFactory, distributed, eval_mode, topk_accuracy
from pretrain.atomic import write_atomically
from pretrain.data import build_loader, expand_shards, read_dataset_info
from pretrain.recipe import run_tool

logger = logging.getLogger("eval.zeroshot")  # also when run as python -m eval.zeroshot

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
EVAL_LOGIT_SCALE = 100.0
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# --------------------------------------------------------------------------------------------- class names, templates

def load_class_names(spec: str | os.PathLike | None, shards: str | os.PathLike | None = None) -> list[str]:
    """Class names, index i naming label i.

    ``"imagenet"``: open_clip's ``IMAGENET_CLASSNAMES``; a path: one name per line (blank lines ignored, no
    duplicates); ``None``: the ``class_names`` recorded in the ``dataset.json`` next to ``shards``.
    """
    if spec is None:
        if shards is None:
            raise ValueError("no class names: pass a class-name spec ('imagenet' or a file) or the labelled shards "
                             "whose dataset.json records them")
        where = _info_location(shards)
        try:
            info = read_dataset_info(shards)
        except FileNotFoundError as exn:
            raise FileNotFoundError(f"cannot take class names from the shards in {where}: {exn}; "
                                    "pass --class-names") from exn
        names = info.get("class_names")
        if not names:
            raise ValueError(f"the dataset.json of the shards in {where} records no class_names; "
                             "pass --class-names ('imagenet' or a file with one name per line)")
        return _check_unique([str(name) for name in names], f"class_names of the dataset.json in {where}")
    if os.fspath(spec) == "imagenet":
        return list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    path = Path(spec)
    lines = _read_lines(path, "class-name")
    names = [(number, line.strip()) for number, line in lines if line.strip()]
    if not names:
        raise ValueError(f"class-name file {path} holds no class names (one name per line, line i naming label i)")
    seen: dict[str, int] = {}
    for number, name in names:
        if name in seen:
            raise ValueError(f"class-name file {path} line {number}: {name!r} repeats line {seen[name]}")
        seen[name] = number
    return [name for _, name in names]


def warn_if_other_than_recorded(class_names: Sequence[str], shards: str | os.PathLike | Sequence[str]) -> None:
    """Log a warning where the shards' ``dataset.json`` records class names that ``class_names`` does not match: more
    names than the data's classes make the task harder than the benchmark, and names in another order score the
    wrong label. Other spellings of the same classes (prompt-friendly names) are legitimate, hence no error."""
    try:
        recorded = read_dataset_info(shards).get("class_names")
    except (FileNotFoundError, ValueError):
        return
    if not recorded:
        return
    recorded = [str(name) for name in recorded]
    where = _info_location(shards)
    if len(class_names) != len(recorded):
        logger.warning("%d class names for shards whose dataset.json (in %s) records %d classes: the classifier "
                       "chooses among %d, so accuracy is not that of the recorded %d-class task", len(class_names),
                       where, len(recorded), len(class_names), len(recorded))
        return
    differing = [index for index, (given, kept) in enumerate(zip(class_names, recorded)) if given != kept]
    if differing:
        first = differing[0]
        logger.warning("%d of the %d class names differ from those recorded in the dataset.json in %s (first: label "
                       "%d is %r there, %r here); fine for other spellings, wrong for another order", len(differing),
                       len(recorded), where, first, recorded[first], class_names[first])


def load_templates(spec: str | os.PathLike, shards: str | os.PathLike | None = None) -> list[str]:
    """Prompt templates as format strings with one ``{}`` where the class name goes.

    ``"openai"``: open_clip's 80 ``OPENAI_IMAGENET_TEMPLATES``; ``"simple"``: its 7 ``SIMPLE_IMAGENET_TEMPLATES``;
    ``"dataset"``: the ``caption_templates`` of the ``dataset.json`` next to ``shards``; a path, or the name of a
    file bundled in ``eval/prompts`` (``fashion_mnist_heldout``): one template per line, each with exactly one
    ``{}`` (``{c}`` is accepted and normalised), blank lines ignored.
    """
    text = os.fspath(spec)
    if text == "openai":
        return [template("{}") for template in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    if text == "simple":
        return [template("{}") for template in zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES]
    if text == "dataset":
        if shards is None:
            raise ValueError("templates 'dataset' need the shards whose dataset.json records caption_templates")
        where = _info_location(shards)
        recorded = read_dataset_info(shards).get("caption_templates")
        if not recorded:
            raise ValueError(f"the dataset.json of the shards in {where} records no caption_templates")
        return [_normalise_template(str(template), f"caption_templates of the dataset.json in {where}", index)
                for index, template in enumerate(recorded)]
    path = Path(spec)
    if not path.exists() and (PROMPTS_DIR / f"{text}.txt").is_file():
        path = PROMPTS_DIR / f"{text}.txt"
    elif not path.exists():
        raise FileNotFoundError(f"template file {path} not found; built-in template sets: "
                                f"{', '.join(['openai', 'simple', 'dataset', *bundled_prompt_sets()])}")
    templates: list[str] = []
    seen: dict[str, int] = {}
    for number, line in _read_lines(path, "template"):
        if not line.strip():
            continue
        template = _normalise_template(line.strip(), f"template file {path}", number)
        if template in seen:
            raise ValueError(f"template file {path} line {number}: {template!r} repeats line {seen[template]}")
        seen[template] = number
        templates.append(template)
    if not templates:
        raise ValueError(f"template file {path} holds no templates (one per line, each with '{{}}' once)")
    return templates


def bundled_prompt_sets() -> list[str]:
    """Names of the template files shipped in ``eval/prompts`` (usable as template specs)."""
    return sorted(path.stem for path in PROMPTS_DIR.glob("*.txt"))


def template_overlap(templates: Sequence[str], shards: str | os.PathLike | Sequence[str]) -> list[str]:
    """The templates that equal one of the ``caption_templates`` recorded in the shards' ``dataset.json``
    (none if the shards have no such record)."""
    try:
        recorded = read_dataset_info(shards).get("caption_templates") or []
    except (FileNotFoundError, ValueError, KeyError):
        return []
    captions = {str(template).replace("{c}", "{}") for template in recorded}
    return [template for template in templates if template in captions]


def _info_location(shards: str | os.PathLike | Sequence[str]) -> str:
    if isinstance(shards, (str, os.PathLike)) and os.path.isdir(shards):
        return os.fspath(shards)
    try:
        return os.path.dirname(expand_shards(shards)[0]) or "."
    except (FileNotFoundError, ValueError):
        return repr(shards)


def _read_lines(path: Path, kind: str) -> list[tuple[int, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: files saved by spreadsheet programs start with a BOM
    except UnicodeDecodeError as exn:
        raise ValueError(f"{kind} file {path} is not UTF-8 text: {exn}") from exn
    return list(enumerate(text.splitlines(), start=1))


def _normalise_template(template: str, where: str, line: int) -> str:
    normalised = template.replace("{c}", "{}")
    rest = normalised.replace("{}", "", 1)
    if normalised.count("{}") != 1 or "{" in rest or "}" in rest:
        raise ValueError(f"{where} line {line}: a template needs exactly one '{{}}' (or '{{c}}') where the class "
                         f"name goes and no other braces, got {template!r}")
    return normalised


def _check_unique(names: list[str], where: str) -> list[str]:
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{where}: class name {name!r} at index {index} repeats index {seen[name]}, so zero-shot "
                             "classification cannot tell the two apart; pass --class-names with distinct names (for "
                             "ImageNet's synset names, which repeat some such as 'crane', --class-names imagenet)")
        seen[name] = index
    return names


def _template_strings(templates: Sequence[str | Callable[[str], str]]) -> list[str]:
    return [template("{}") if callable(template) else str(template) for template in templates]


# --------------------------------------------------------------------------------------------- classifier, evaluation

def build_classifier(model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                     templates: Sequence[str | Callable[[str], str]], device: str | torch.device, *,
                     autocast: AutocastFactory = contextlib.nullcontext,
                     num_classes_per_batch: int = 10) -> torch.Tensor:
    """Zero-shot weights ``[D, C]`` (float32, on ``device``): per class, the re-normalised mean of the normalised
    text embeddings of every template filled with the class name (open_clip's ``build_zero_shot_classifier``).

    Pass the unwrapped model (``accelerator.unwrap_model``); under DeepSpeed ZeRO-3 call it on every rank.
    """
    if not class_names:
        raise ValueError("no class names to build a zero-shot classifier from")
    if not templates:
        raise ValueError("no templates to build a zero-shot classifier from")
    with eval_mode(model), torch.no_grad(), autocast():
        weights = open_clip.build_zero_shot_classifier(
            model, tokenizer, list(class_names), _template_strings(templates),
            num_classes_per_batch=num_classes_per_batch, device=device)
    return weights.float()


def evaluate(model: nn.Module, classifier: torch.Tensor, loader: Iterable, device: str | torch.device,
             autocast: AutocastFactory = contextlib.nullcontext) -> dict:
    """Top-1 and top-5 accuracy (percent), mean cross-entropy and the sample count of ``loader``'s
    ``(images, labels)`` batches, with logits ``100 * model.encode_image(images, normalize=True) @ classifier``.

    Distributed as :func:`eval.accuracy.topk_accuracy`: call it on every rank, each with its own part of the data.
    """
    device = torch.device(device)
    classifier = classifier.to(device=device, dtype=torch.float32)

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        return EVAL_LOGIT_SCALE * model.encode_image(images, normalize=True).float() @ classifier

    with eval_mode(model):
        return topk_accuracy(logits_of, loader, classifier.shape[1], device, autocast)


def zero_shot(model: nn.Module, tokenizer: Callable, shards: str | os.PathLike | Sequence[str], *,
              class_names: Sequence[str] | str | None = None,
              templates: Sequence[str | Callable[[str], str]] | str = "openai",
              image_size: int | None = None, batch_size: int = 256, num_workers: int = 4,
              device: str | torch.device = "cpu", mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, rank: int = 0, world_size: int = 1,
              autocast: AutocastFactory = contextlib.nullcontext, crop_pct: float = 1.0) -> dict:
    """Zero-shot top-1/top-5 of ``model`` on labelled ``shards``: loader (this rank's part), classifier, evaluation.

    ``class_names`` and ``templates`` are lists, or specs for :func:`load_class_names` / :func:`load_templates`
    (``None``: the shards' class names). ``image_size``, ``mean`` and ``std`` default to the model's
    ``open_clip.get_model_preprocess_cfg``. Returns ``top1``, ``top5``, ``samples`` (all ranks),
    ``classes``, ``templates`` (their count) and ``overlapping_templates`` (templates the shards' captions were
    generated from; a warning is logged if there are any). In a distributed run every rank must call it, with its
    own ``rank`` and the job's ``world_size``.
    """
    running = dist.get_world_size() if distributed() else 1
    if world_size != running:
        raise ValueError(f"world_size={world_size} but {running} process(es) run torch.distributed: call zero_shot "
                         "on every rank with rank=<its index> and world_size=<number of processes>")
    if class_names is None or isinstance(class_names, (str, os.PathLike)):
        class_names = load_class_names(class_names, shards)
    warn_if_other_than_recorded(class_names, shards)
    templates = load_templates(templates, shards) if isinstance(templates, (str, os.PathLike)) \
        else _template_strings(templates)
    overlap = template_overlap(templates, shards)
    if overlap:
        logger.warning(
            "%d of the %d zero-shot templates are caption templates of the evaluated shards (%s): accuracy with "
            "them measures memorisation of the captions; use held-out templates to measure transfer",
            len(overlap), len(templates), "; ".join(repr(template) for template in overlap))
    preprocess = preprocess_settings(model)
    image_size = image_size or preprocess["size"]
    loader = build_loader(shards, "eval", batch_size, image_size, rank=rank, world_size=world_size,
                          num_workers=num_workers, mean=mean or preprocess["mean"], std=std or preprocess["std"],
                          crop_pct=crop_pct, pin_memory=torch.device(device).type == "cuda")
    classifier = build_classifier(model, tokenizer, class_names, templates, device, autocast=autocast)
    result = evaluate(model, classifier, loader, device, autocast=autocast)
    return {**result, "classes": len(class_names), "templates": len(templates), "overlapping_templates": overlap}


def preprocess_settings(model: nn.Module) -> dict:
    """Square input size, mean and std of ``open_clip.get_model_preprocess_cfg(model)`` (open_clip's defaults,
    the OpenAI mean and std, where the model records none)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if not isinstance(size, int):
        height, width = size
        if height != width:
            raise ValueError(f"the model's preprocess size {tuple(size)} is not square; pass an image size")
        size = height
    return {"size": int(size), "mean": tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))}


# --------------------------------------------------------------------------------------------- command line

def load_model(name: str, pretrained: str | None, device: torch.device) -> tuple[nn.Module, Callable]:
    """An open_clip model and its tokenizer from a config name (+ weights) or ``local-dir:PATH``."""
    if name.startswith(open_clip.factory.LOCAL_DIR_PREFIX):
        folder = Path(name[len(open_clip.factory.LOCAL_DIR_PREFIX):])
        if pretrained:
            raise ValueError("--pretrained does not apply to a local-dir: model (its folder holds the weights)")
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder / 'open_clip_config.json'} not found: local-dir: must name a folder "
                                    "with an exported open_clip model (open_clip_config.json + weights)")
        if not any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):
            raise FileNotFoundError(f"{folder} holds no weights (*.safetensors, *.bin or *.pth)")
    else:
        if name not in open_clip.list_models():
            ours = [model for model in open_clip.list_models() if re.search("vig|vim", model, re.IGNORECASE)]
            raise ValueError(f"unknown open_clip model {name!r}; ViG/Vim configs: {', '.join(ours) or 'none'} "
                             f"(open_clip.list_models() has {len(open_clip.list_models())} in all), or pass "
                             "local-dir:PATH of an exported model")
        if pretrained is None:
            logger.warning("no --pretrained weights for %s: evaluating the model as initialised", name)
        elif not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(name, pretrained):
            raise FileNotFoundError(f"--pretrained {pretrained} is neither a file nor a pretrained tag of {name}")
    model = open_clip.create_model(name, pretrained=pretrained, device=device)
    return model.eval(), open_clip.get_tokenizer(name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="open_clip config name (e.g. ViG-T-16) or local-dir:PATH")
    parser.add_argument("--pretrained", help="weights file for a config name (safetensors or torch checkpoint)")
    parser.add_argument("--shards", required=True, help="labelled shards: directory, brace or glob pattern")
    parser.add_argument("--class-names", help="'imagenet' or a file with one name per line "
                                              "(default: class_names of the shards' dataset.json)")
    parser.add_argument("--templates", default="openai",
                        help="'openai' (80), 'simple' (7), 'dataset', a bundled set "
                             f"({', '.join(bundled_prompt_sets())}) or a file with one template per line")
    parser.add_argument("--image-size", type=int, help="default: the model's preprocess size (a config name's is "
                                                       "its registered size, a local-dir export's the trained one)")
    parser.add_argument("--crop-pct", type=float, default=1.0, help="center crop fraction (open_clip: 1.0)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", "--num-workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="autocast dtype")
    parser.add_argument("--output", type=Path, help="write the result as JSON here (atomically)")
    args = parser.parse_args(argv)

    expand_shards(args.shards)  # fail on a missing pattern before building anything
    class_names = load_class_names(args.class_names, args.shards)
    templates = load_templates(args.templates, args.shards)
    device = torch.device(args.device)
    model, tokenizer = load_model(args.model, args.pretrained, device)
    dtype = PRECISIONS[args.precision]

    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    preprocess = preprocess_settings(model)
    image_size = args.image_size or preprocess["size"]
    metrics = zero_shot(model, tokenizer, args.shards, class_names=class_names, templates=templates,
                        image_size=image_size, batch_size=args.batch_size, num_workers=args.workers,
                        device=device, mean=preprocess["mean"], std=preprocess["std"], autocast=autocast,
                        crop_pct=args.crop_pct)
    result = {"model": args.model, "pretrained": args.pretrained, "shards": args.shards,
              "class_names": args.class_names or "dataset.json", "template_set": args.templates,
              "image_size": image_size, "precision": args.precision, **metrics}
    if args.output:
        write_atomically(args.output, (json.dumps(result, indent=2) + "\n").encode())
    print(f"zero-shot top-1 {result['top1']:.2f} %, top-5 {result['top5']:.2f} % on {result['samples']} images "
          f"({result['classes']} classes, {result['templates']} templates)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_tool(main)
