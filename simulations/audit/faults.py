"""The test-only DP faults a privacy audit must detect (simulations/audit/canaries.py makes each).

Its own module so the audit command (privacy.py, light imports) and the canaries (torch) share
the names without importing each other.
"""

NONE, NO_NOISE, NO_CLIPPING = "none", "no-noise", "no-clipping"
WRONG_SAMPLE_RATE = "wrong-sample-rate"
FAULTS = (NONE, NO_NOISE, NO_CLIPPING, WRONG_SAMPLE_RATE)
