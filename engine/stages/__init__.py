"""The steps of ingest: receive, validate, dedupe, write, index. One module each.

Validate, dedupe and write run as one stage, batch by batch (``engine/pipeline.py``
says why); index is the other stage.

Stages never import ``engine.dicom`` or ``engine.web``; ``engine.pipeline`` wires
the network adapters to them.
"""
