"""Between-graph replication (TF1-style graphs, one per process); see :mod:`.trainer`.

Modules: ``trainer`` (the run loop, export), ``input`` (the per-worker ``tf.data`` pipeline).
"""

from kubeai_train.tf.between_graph.trainer import RunResult, run

__all__ = ["RunResult", "run"]
