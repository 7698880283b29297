"""privacy: secure aggregation and differential privacy.

Pure state machines and value-in, value-out functions (SecAgg+ client and
server halves, clipping, noise, accounting). May import fedcore only.
"""

__all__: list[str] = []
