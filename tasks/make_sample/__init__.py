"""make_sample: the embedded LVIS-format dataset, rendered with trimesh + pyrender.

shapes (categories and meshes) -> layout (objects resting on and touching each other, camera,
lights, ground and backdrop) -> renderer (colour, segmentation, each object alone) -> annotate
(polygons/RLE, amodal masks, depth order) -> dataset (chunks of images, the LVIS v1 file).
"""
