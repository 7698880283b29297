"""privacy: secure aggregation and differential privacy.

Pure state machines and value-in, value-out functions: differential privacy
(`privacy.dp`: clipping, noise, accounting, budgets, distributed encoding,
DP-SGD) and secure aggregation (`privacy.secagg`: the SecAgg+ client and
server halves as pure state machines). May import fedcore only.
"""

from privacy import dp, secagg

__all__ = ["dp", "secagg"]
