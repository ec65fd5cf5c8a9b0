"""render_priors: decompose's sample shards -> multi-view shape priors, one row per distinct object.

Plain functions (no Prefect here); ``flows/render_priors.py`` wraps them in Prefect tasks and fans
shards out on Ray. Modules: ``pipeline`` (scan, plan, resume, finalize), ``work`` (one output shard
in a worker), ``store`` (reading priors back by object key), ``grid`` (the picture),
``coco_objects`` (real test/benchmark inputs cut from COCO/LVIS annotations).
"""
