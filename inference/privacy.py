"""Differential privacy for user-profile embeddings that leave the trust boundary.

**What is protected, against whom.** A profile embedding summarises what one user watched. A
release (one noised vector on ``profiles.embeddings``) must not let its reader, analytics or
anyone downstream, tell which of *any two* profiles the user had. The neighbouring relation is
**user-level replace-one**: two inputs are neighbours when they are two arbitrary profiles of the
same user (everything else equal). After clipping every vector to L2 norm at most ``C``, two
neighbours differ by at most ``2C``, so the L2 sensitivity is ``Δ = 2C`` (not ``C``: that would
only cover a vector and the zero vector, and halve the real protection).

**The mechanism.** Clip to ``C``, add ``N(0, σ² I)`` with ``σ`` from the *analytic* Gaussian
mechanism (Balle & Wang, "Improving the Gaussian Mechanism for Differential Privacy", ICML 2018,
Theorem 8), valid for every ``ε > 0`` (the classic ``σ = Δ √(2 ln(1.25/δ)) / ε`` is proved only
for ``ε < 1`` and is looser). The release is (ε, δ)-DP if and only if::

    Φ(Δ/(2σ) − εσ/Δ) − e^ε · Φ(−Δ/(2σ) − εσ/Δ)  ≤  δ

where ``Φ`` is the standard normal CDF; the left side falls as ``σ`` grows, and
:func:`analytic_gaussian_sigma` finds the smallest such ``σ`` by bisection (keeping the upper,
safe end). For ε = 1, δ = 1e-5, Δ = 2 it gives σ ≈ 7.46 per coordinate (classic: 9.69).

**The noise source.** Gaussian draws come from the operating system's CSPRNG (``os.urandom``,
Box–Muller on 53-bit uniforms), never from a caller-seeded generator: a predictable seed would let
whoever knows it subtract the noise. Tests may pass ``insecure_rng_for_tests`` to get reproducible
draws; the name says what it is. (Floating-point sampling is not hardened against the
least-significant-bit attacks of Mironov 2012; see ``docs/privacy.md``.)

**Accounting.** The Gaussian mechanism with sensitivity ``Δ`` and noise ``σ`` is exactly
``ρ = Δ² / (2σ²)``-zCDP (Bun & Steinke 2016, Prop. 1.6), and ρ-zCDP mechanisms compose by adding
their ρ. A user's releases are summed in ρ and reported as ``ε(ρ, δ) = ρ + 2 √(ρ ln(1/δ))``
(Prop. 1.3), tighter than adding the ε's. :class:`PrivacyLedger` keeps each user's spent ρ in
Redis and grants a release only while the total stays within the budget (atomically, before the
release is published).
"""

# ruff: noqa: RUF002, RUF003  (the formulas read as in the papers: σ, ρ, ε, δ, Δ, minus signs)

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from inference.exceptions import InferenceError

if TYPE_CHECKING:
    import redis

    from recstream.keys import Keys

__all__ = [
    "MECHANISM",
    "GaussianMechanism",
    "Grant",
    "GrantOutcome",
    "PrivacyLedger",
    "analytic_gaussian_sigma",
    "clip_l2",
    "epsilon_to_rho",
    "rho_to_epsilon",
    "secure_normal",
]

MECHANISM = "analytic-gaussian/zcdp"
"""The ``mechanism`` field of a release: analytic Gaussian noise, accounted in zCDP."""

MAX_EPSILON = 50.0  # far beyond any meaningful guarantee; keeps e^ε finite in the calibration

Vectors = npt.NDArray[np.float32]


def clip_l2(vectors: npt.NDArray[np.floating], clip_norm: float) -> npt.NDArray[np.float64]:
    """Scale each row (or the single vector) down to L2 norm at most ``clip_norm``."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    scale = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
    result: npt.NDArray[np.float64] = v * scale
    return result


def _phi(x: float) -> float:
    """Standard normal CDF; ``erfc`` keeps the lower tail accurate far below -1."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _delta_of(sigma: float, epsilon: float, sensitivity: float) -> float:
    """The smallest δ for which N(0, σ²) noise is (ε, δ)-DP (Balle & Wang 2018, Theorem 8)."""
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    # If the second term underflows to 0 the result is larger, never smaller: a safe error.
    return _phi(a - b) - math.exp(epsilon) * _phi(-a - b)


def _check(epsilon: float, delta: float) -> None:
    if not (0.0 < epsilon <= MAX_EPSILON) or math.isnan(epsilon):
        raise InferenceError(f"epsilon must be in (0, {MAX_EPSILON}], got {epsilon}")
    if not (0.0 < delta < 1.0):
        raise InferenceError(f"delta must be in (0, 1), got {delta}")


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest σ (within 1e-10 relative) with which the Gaussian mechanism is (ε, δ)-DP.

    Bisection on the exact condition of the module docstring; the returned end satisfies it.
    """
    _check(epsilon, delta)
    if not sensitivity > 0.0 or not math.isfinite(sensitivity):
        raise InferenceError(f"sensitivity must be positive, got {sensitivity}")
    low, high = 0.0, sensitivity
    while _delta_of(high, epsilon, sensitivity) > delta:
        low, high = high, 2.0 * high
    while high - low > 1e-10 * high:
        mid = 0.5 * (low + high)
        if _delta_of(mid, epsilon, sensitivity) > delta:
            low = mid
        else:
            high = mid
    return high


def rho_to_epsilon(rho: float, delta: float) -> float:
    """ε of a ρ-zCDP mechanism at ``delta``: ``ρ + 2 √(ρ ln(1/δ))`` (Bun & Steinke, Prop. 1.3)."""
    if rho < 0.0 or not 0.0 < delta < 1.0:
        raise InferenceError(f"need rho >= 0 and delta in (0, 1), got {rho}, {delta}")
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def epsilon_to_rho(epsilon: float, delta: float) -> float:
    """The largest ρ whose :func:`rho_to_epsilon` at ``delta`` is ``epsilon`` (the inverse)."""
    _check(epsilon, delta)
    log_inv = math.log(1.0 / delta)
    return (math.sqrt(log_inv + epsilon) - math.sqrt(log_inv)) ** 2


def secure_normal(shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """Standard normal draws from ``os.urandom`` (Box–Muller; both outputs used)."""
    n = int(np.prod(shape))
    pairs = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    # 53 random bits -> a uniform double; 1 - u lies in (0, 1], so the log is finite.
    u1 = 1.0 - (raw[0] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    draws = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
    result: npt.NDArray[np.float64] = draws.reshape(shape)
    return result


@dataclass(frozen=True, slots=True)
class GaussianMechanism:
    """(ε, δ)-DP release of one user's embedding: clip to ``clip_norm``, add N(0, σ²) noise.

    Sensitivity is ``2 * clip_norm`` (user-level replace-one); σ is the analytic Gaussian
    calibration; every release costs :attr:`rho` in zCDP.
    """

    epsilon: float = 1.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    sigma: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.clip_norm > 0.0 or not math.isfinite(self.clip_norm):
            raise InferenceError(f"clip_norm must be positive, got {self.clip_norm}")
        sigma = analytic_gaussian_sigma(self.epsilon, self.delta, self.sensitivity)
        object.__setattr__(self, "sigma", sigma)  # frozen: derived once here

    @property
    def sensitivity(self) -> float:
        """L2 distance between any two clipped profiles of one user: ``2 C``."""
        return 2.0 * self.clip_norm

    @property
    def rho(self) -> float:
        """zCDP cost of one release: ``Δ² / (2σ²)``."""
        return self.sensitivity**2 / (2.0 * self.sigma**2)

    def privatize(
        self,
        vectors: npt.NDArray[np.floating],
        *,
        renormalize: bool = False,
        insecure_rng_for_tests: np.random.Generator | None = None,
    ) -> Vectors:
        """Clip, add noise and optionally rescale to unit length; one release per row.

        ``vectors`` is one embedding ``(d,)`` or a batch ``(n, d)``, each row one user's. Without
        renormalising, a release is an unbiased estimate of the clipped profile (the mean of
        many users' releases estimates their mean); renormalising is post-processing and keeps
        the guarantee. ``insecure_rng_for_tests`` replaces the CSPRNG: tests only.
        """
        clipped = clip_l2(vectors, self.clip_norm)
        if insecure_rng_for_tests is None:
            noise = secure_normal(clipped.shape)
        else:
            noise = insecure_rng_for_tests.standard_normal(clipped.shape)
        noised = clipped + self.sigma * noise
        if renormalize:
            norms = np.linalg.norm(noised, axis=-1, keepdims=True)
            noised = noised / np.maximum(norms, 1e-12)
        result: Vectors = noised.astype(np.float32)
        return result


class GrantOutcome(StrEnum):
    """What the ledger decided about one release."""

    GRANTED = "granted"  # budget spent; publish the payload
    PENDING = "pending"  # this version was granted but not confirmed: publish the stored payload
    DUPLICATE = "duplicate"  # this version (or a newer one) was already released
    REFUSED = "refused"  # the release would exceed the user's budget: not published


@dataclass(frozen=True, slots=True)
class Grant:
    outcome: GrantOutcome
    spent_rho: float  # the user's spent ρ in the current window, after this decision
    payload: bytes | None  # what to publish (GRANTED: the caller's, PENDING: the stored one)


# KEYS[1] the user's ledger hash. ARGV: version, cost ρ, budget ρ, now (s), window (s, 0 = none),
# payload. Fields: version (last granted), rho (spent in the window), window_start, pending (the
# granted payload until its delivery is confirmed), refused (count). A replayed or older version
# never spends twice; a granted one not yet confirmed is re-published from ``pending``.
_SPEND = """
local version = tonumber(ARGV[1])
local cost, budget = tonumber(ARGV[2]), tonumber(ARGV[3])
local now, window = tonumber(ARGV[4]), tonumber(ARGV[5])
local h = redis.call('HMGET', KEYS[1], 'version', 'rho', 'window_start', 'pending')
local granted = tonumber(h[1]) or 0
local rho = tonumber(h[2]) or 0
local start = tonumber(h[3]) or now
if version <= granted then
  if version == granted and h[4] then return {'pending', tostring(rho), h[4]} end
  return {'duplicate', tostring(rho)}
end
if window > 0 and now - start >= window then rho, start = 0, now end
if rho + cost > budget then
  redis.call('HINCRBY', KEYS[1], 'refused', 1)
  return {'refused', tostring(rho)}
end
rho = rho + cost
redis.call('HSET', KEYS[1], 'version', version, 'rho', tostring(rho),
  'window_start', tostring(start), 'pending', ARGV[6])
if window > 0 then
  redis.call('PEXPIREAT', KEYS[1], math.floor((start + window) * 1000))
end
return {'granted', tostring(rho)}
"""

# KEYS[1] the ledger; ARGV[1] the delivered version: its stored payload is no longer owed.
_CONFIRM = """
if tonumber(redis.call('HGET', KEYS[1], 'version')) == tonumber(ARGV[1]) then
  redis.call('HDEL', KEYS[1], 'pending')
  return 1
end
return 0
"""


class PrivacyLedger:
    """Each user's spent privacy budget (zCDP ρ) in Redis, ``Keys.privacy_ledger(user)``.

    :meth:`spend` is one Lua script: it checks the version (one release per profile version),
    resets the window when it is over, refuses a release that would take the user's ρ past
    ``budget_rho``, and otherwise adds the cost and keeps the payload until :meth:`confirm`.
    Spending happens before the release is published, so a crash between the two loses at most
    a release, never the record of its cost; the kept payload is published again on redelivery
    (the same noised vector twice costs nothing more).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        budget_rho: float,
        window_s: float,
    ) -> None:
        if budget_rho <= 0.0 or window_s < 0.0:
            raise InferenceError("the budget must be positive and the window non-negative")
        self.client = client
        self.keys = keys
        self.budget_rho = budget_rho
        self.window_s = window_s
        self._spend = client.register_script(_SPEND)
        self._confirm = client.register_script(_CONFIRM)

    def spend(
        self, user_id: str, version: int, cost_rho: float, payload: bytes, now: float | None = None
    ) -> Grant:
        """Decide one release of ``user_id``'s profile ``version`` costing ``cost_rho``."""
        args: list[Any] = [
            version,
            repr(cost_rho),
            repr(self.budget_rho),
            repr(time.time() if now is None else now),
            repr(self.window_s),
            payload,
        ]
        reply = self._spend(keys=[self.keys.privacy_ledger(user_id)], args=args)
        outcome = GrantOutcome(_text(reply[0]))
        stored = bytes(reply[2]) if len(reply) > 2 else None
        kept = payload if outcome is GrantOutcome.GRANTED else stored
        return Grant(outcome, float(_text(reply[1])), kept)

    def confirm(self, user_id: str, version: int) -> bool:
        """The release of ``version`` was delivered: drop its kept payload."""
        return bool(self._confirm(keys=[self.keys.privacy_ledger(user_id)], args=[version]))

    def spent_rho(self, user_id: str) -> float:
        """ρ spent by ``user_id`` in the current window (0 for a user never released)."""
        raw = self.client.hget(self.keys.privacy_ledger(user_id), "rho")
        return 0.0 if raw is None else float(_text(raw))

    def refused(self, user_id: str) -> int:
        """Releases of ``user_id`` refused for lack of budget (in the current window's key)."""
        raw = self.client.hget(self.keys.privacy_ledger(user_id), "refused")
        return 0 if raw is None else int(_text(raw))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
