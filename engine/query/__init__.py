"""C-FIND over the index: identifiers in, SQL out, response identifiers back.

Pure logic over the SQLite index (no networking): ``find.plan`` checks a request
identifier against the Query/Retrieve information model and turns it into one
parameterised query; ``find.run`` executes it and builds the responses. The
network layer (``engine/dicom/qr.py``) only moves identifiers and statuses.
"""

from engine.query.find import Matches, Model, Plan, QueryError, plan, run
from engine.query.levels import Level

__all__ = ["Level", "Matches", "Model", "Plan", "QueryError", "plan", "run"]
