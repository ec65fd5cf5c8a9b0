"""The layout stage: ``pics layout`` (element PNGs into a target mask) and the flow that packs the
decomposed dataset's silhouettes into procedural shapes (pics_model.layout is the method)."""
