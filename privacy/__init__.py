"""privacy: secure aggregation and differential privacy.

Pure state machines and value-in, value-out functions: differential privacy
(`privacy.dp`: clipping, noise, accounting, budgets, distributed encoding,
DP-SGD) and secure aggregation. May import fedcore only.
"""

from privacy import dp

__all__ = ["dp"]
