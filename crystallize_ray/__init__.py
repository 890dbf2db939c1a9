"""crystallize_ray: run crystallize experiments on Ray, unchanged.

``RayExecution`` is an execution backend: put it in ``Experiment(plugins=[...])``
in place of ``ParallelExecution`` and every replicate × condition runs as a Ray task,
on an embedded local Ray or on a cluster.
"""

from .execution import RayExecution

__all__ = ["RayExecution"]
