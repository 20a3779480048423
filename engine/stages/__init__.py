"""The five stages: receive, validate, dedupe, write, index. One module each.

Stages never import ``engine.dicom`` or ``engine.web``; ``engine.pipeline`` wires
the network adapters to them.
"""
