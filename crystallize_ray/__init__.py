"""crystallize_ray: run crystallize experiments on Ray, unchanged.

``RayExecution`` is an execution backend: put it in ``Experiment(plugins=[...])``
in place of ``ParallelExecution`` and every replicate × condition runs as a Ray task,
on an embedded local Ray or on a cluster; heavy steps become actor pools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .execution import RayExecution

__all__ = ["RayExecution"]


def __getattr__(name: str) -> Any:
    # Imported on first use: a Ray worker imports only what runs there (the task body),
    # which keeps a fresh worker's first run short.
    if name == "RayExecution":
        from .execution import RayExecution

        return RayExecution
    raise AttributeError(f"module 'crystallize_ray' has no attribute {name!r}")
