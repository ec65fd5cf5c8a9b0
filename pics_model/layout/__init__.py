"""Image-space collage and packing by differentiable rendering (Wang & Lu, SIGGRAPH 2025), in pure torch.

Elements are raster silhouettes placed by translation, rotation and uniform scale through a
differentiable warp (``affine_grid`` + ``grid_sample`` of softened masks); image-space losses
(containment, overlap, uniformity) are minimised by Adam on a coarse-to-fine resolution schedule.
A greedy object-space packer is the baseline. Components, one file each:

    elements.py  silhouettes -> square, centred element masks; mip levels with soft edges
    warp.py      (tx, ty, theta, scale) -> affine grids -> rendered alpha [N, H, W]
    losses.py    containment, overlap hinge, pair-overlap target, uniformity
    init.py      initial scale (area ratio) and positions (distance-transform maxima)
    optimize.py  LayoutConfig and :func:`pack`, the hierarchical optimisation
    greedy.py    :func:`greedy_pack`, the object-space baseline
    metrics.py   placed masks at the target's size, coverage / overlap / exceed
"""
from pics_model.layout.elements import Element, make_element, make_elements
from pics_model.layout.greedy import greedy_pack
from pics_model.layout.metrics import layout_metrics, placed_masks
from pics_model.layout.optimize import LayoutConfig, pack
from pics_model.layout.placement import Placement

__all__ = ["Element", "LayoutConfig", "Placement", "greedy_pack", "layout_metrics", "make_element", "make_elements",
           "pack", "placed_masks"]
