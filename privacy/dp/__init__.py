"""privacy.dp: differential privacy for federated rounds, as a pure core.

Values in, values out, no I/O: clipping (fixed, adaptive), Gaussian noise
from flagged generators, Poisson cohort sampling, JSON-able privacy events
and the accountants that turn them into ε, the budget check that runs before
each round, central DP-FedAvg as a `fedcore.Strategy`, the distributed
discrete Gaussian encoding for secure aggregation, and the validated DP
configuration. Clipping, noise and accountant are independent options that
compose, not one class per combination.

Imports fedcore only, of this project's packages. numpy and pydantic are
the only libraries needed at import time: the accountants import
dp-accounting (the `[dp]` extra) when first used, and the Opacus DP-SGD
helper lives in `privacy.dp.dpsgd`, which imports torch and is imported
explicitly, by client code only.
"""

from privacy.dp.accounting import (
    Accountant,
    PldAccountant,
    RdpAccountant,
    distributed_gaussian_rdp,
    epsilon,
)
from privacy.dp.budget import (
    BudgetCheck,
    PrivacyBudget,
    calibrate_noise_multiplier,
    check_budget,
)
from privacy.dp.central import CappedWeights, DpAggregate, DpFedAvg, DpRelease, UniformWeights
from privacy.dp.clipping import (
    AdaptiveClipping,
    ClippingPolicy,
    FixedClipping,
    clip,
    corrected_noise_multiplier,
    l2_norm,
)
from privacy.dp.config import (
    AccountantKind,
    ClippingKind,
    DpConfig,
    DpMode,
    WeightingKind,
    central_strategy,
    distributed_params,
    validate,
)
from privacy.dp.discrete import (
    discrete_gaussian,
    discrete_gaussian_exact,
    discrete_gaussian_variance,
)
from privacy.dp.distributed import DistributedDp, decode, encode, ring_sum, sum_norm_bound
from privacy.dp.events import (
    DistributedGaussianEvent,
    GaussianEvent,
    PrivacyEvent,
    dump_events,
    load_events,
)
from privacy.dp.hadamard import fwht, padded_size, rotate, unrotate
from privacy.dp.noise import GaussianNoise, NoiseSource
from privacy.dp.sampling import expected_cohort, poisson_sample

__all__ = [
    "Accountant",
    "AccountantKind",
    "AdaptiveClipping",
    "BudgetCheck",
    "CappedWeights",
    "ClippingKind",
    "ClippingPolicy",
    "DistributedDp",
    "DistributedGaussianEvent",
    "DpAggregate",
    "DpConfig",
    "DpFedAvg",
    "DpMode",
    "DpRelease",
    "FixedClipping",
    "GaussianEvent",
    "GaussianNoise",
    "NoiseSource",
    "PldAccountant",
    "PrivacyBudget",
    "PrivacyEvent",
    "RdpAccountant",
    "UniformWeights",
    "WeightingKind",
    "calibrate_noise_multiplier",
    "central_strategy",
    "check_budget",
    "clip",
    "corrected_noise_multiplier",
    "decode",
    "discrete_gaussian",
    "discrete_gaussian_exact",
    "discrete_gaussian_variance",
    "distributed_gaussian_rdp",
    "distributed_params",
    "dump_events",
    "encode",
    "epsilon",
    "expected_cohort",
    "fwht",
    "l2_norm",
    "load_events",
    "padded_size",
    "poisson_sample",
    "ring_sum",
    "rotate",
    "sum_norm_bound",
    "unrotate",
    "validate",
]
