"""decompose: turn an LVIS/COCO-format dataset into training shards of interacting object groups.

Modules, in pipeline order:
- ``inputs``: read and check the annotation file (fails at once on a malformed file), resolve images.
- ``masks``: annotation -> COCO RLE with pycocotools, each defect named (invalid_polygon, ...).
- ``pairing``: the reference pair rule, the interaction (contact) rule, groups of 3-4.
- ``sample``: one sample's arrays: patches, expanded boxes, region map, PNG encoding.
- ``shard``: one shard of images -> one parquet file + its progress record (the unit of work).
- ``pipeline``: plan shards, resume, merge into ``quarantine.parquet`` and ``manifest.json``.
- ``webdataset``: importer for the reference implementation's tar shards.
- ``visualize``: the sample grid (PNG + HTML).
- ``synthetic``: cheap random LVIS-format data for tests and the benchmark (not the embedded dataset).
"""
