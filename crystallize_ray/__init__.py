"""crystallize_ray: run crystallize experiments on Ray (see RayExecution)."""

__all__: list[str] = []
