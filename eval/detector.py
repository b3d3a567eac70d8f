"""A pretrained ViG, ViG-H or Vim tower as the backbone of torchvision's Faster R-CNN.

The tower's 4-level pyramid (strides 4-32, ``eval/segmenter.py``'s :class:`TowerPyramid`, as ViTDet's simple
pyramid and BEiT's UperNet input) feeds torchvision's ``FeaturePyramidNetwork`` with a max-pooled fifth level
(stride 64), then the standard RPN and RoI heads. The tower is built at a fixed input size, so torchvision's
transform resizes each image's longer side to that size and pads the batch to a square of it (ViTDet pads to a
fixed square too); boxes come back in the coordinates of the images given.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from eval.segmenter import TowerPyramid, prefixed_groups

ANCHOR_RATIOS = (0.5, 1.0, 2.0)


class PyramidBackbone(TowerPyramid):
    """The tower's pyramid through an FPN: ``OrderedDict`` of ``out_channels``-channel maps "0"-"3" and "pool"."""

    def __init__(self, tower: nn.Module, out_channels: int):
        super().__init__(tower)
        self.fpn = FeaturePyramidNetwork(self.pyramid_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(level), x) for level, x in enumerate(self.pyramid(images))))


class Detector(FasterRCNN):
    """Faster R-CNN on :class:`PyramidBackbone`; ``num_classes`` counts the objects' classes, not background
    (torchvision's label 0): targets and detections use labels 1..num_classes. ``proposals`` RPN boxes are kept
    per image at test time, twice as many in training, and ``rois_per_image`` of them sampled for the RoI heads
    (torchvision's defaults: 1000 and 512)."""

    def __init__(self, tower: nn.Module, num_classes: int, image_size: int, fpn_dim: int = 256,
                 box_head_dim: int = 1024, anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
                 detections_per_image: int = 100, proposals: int = 1000, rois_per_image: int = 512):
        backbone = PyramidBackbone(tower, fpn_dim)
        levels = len(backbone.pyramid_channels) + 1
        if len(anchor_sizes) != levels:
            raise ValueError(f"model.anchor_sizes holds {len(anchor_sizes)} sizes; the FPN has {levels} levels "
                             "(strides 4-64), one size each")
        cfg = backbone.pretrained_cfg
        # size_divisible = image_size pads every batch to image_size x image_size, the tower's fixed input.
        super().__init__(backbone, min_size=image_size, max_size=image_size,
                         image_mean=list(cfg["mean"]), image_std=list(cfg["std"]),
                         rpn_anchor_generator=AnchorGenerator(tuple((size,) for size in anchor_sizes),
                                                              (ANCHOR_RATIOS,) * levels),
                         box_head=TwoMLPHead(fpn_dim * 7 ** 2, box_head_dim),
                         box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
                         box_detections_per_img=detections_per_image,
                         rpn_pre_nms_top_n_train=2 * proposals, rpn_post_nms_top_n_train=2 * proposals,
                         rpn_pre_nms_top_n_test=proposals, rpn_post_nms_top_n_test=proposals,
                         box_batch_size_per_image=rois_per_image)
        self.transform.size_divisible = image_size
        self.pretrained_cfg = cfg

    def group_matcher(self, coarse: bool = False) -> dict:
        """The tower's layer groups (under ``backbone.backbone.``); FPN, RPN and RoI heads train at the full LR."""
        return prefixed_groups(self.backbone.group_matcher(coarse), "backbone")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
