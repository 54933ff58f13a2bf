"""What server and node agree on for SecAgg+ (run config secure-aggregation = true).

Flower's SecAgg+ works on integers: each hospital multiplies its update by its weight
w / max_weight, clips every coordinate to +-clipping_range, maps it onto
0..quantization_range with unbiased stochastic rounding, adds its masks modulo
modulus_range, and the server dequantises the unmasked sum. The choices (docs/privacy.md,
"Secure aggregation"):

- fedvox sends the UPDATE (trained - global weights), not the weights: a round moves a
  coordinate by far less than a weight's size (measured below), so a small clipping range
  buys fine quantisation. The server adds the mean update to the global model it sent.
- clipping_range 2.0: the clip applies to (w / max_weight) x update, so an update coordinate
  passes up to 2.0 x max_weight / w (>= 2.0). The largest coordinate change of one round
  measured on the demo's 2D recipe (scatter-cnn, 4 local epochs, learning rate 0.05, first
  round: the largest steps of a run) was 0.32 with DP (hospitals 1 and 3) and 0.35 without.
  A larger change would be clipped (the node logs it); the others' sum stays right.
- quantization_range 2**24: one step is 2 * 2.0 / 2**24 = 2.4e-7 per coordinate, below the
  float32 resolution of a weight near 1 (6e-8 .. 1.2e-7) times a few; the masked sum of k
  hospitals needs k * 2**24 < modulus_range = 2**32, i.e. at most 256 hospitals per round.
- max_weight 10000: the weight is the hospital's noisy training-set count (the FedAvg
  weight, rounded to 10s); a larger count is capped here (the node logs it), so w / max_weight
  never passes 1 and the scaled update never passes the clipping range because of its weight.
  The smaller max_weight, the finer the mean (the error below divides by sum w / max_weight);
  10000 training cases is more than any one site of fedvox's tasks holds.

The quantisation error of the mean is unbiased and at most k steps / (sum of w / max_weight)
per coordinate for k hospitals; tests/test_secagg.py measures it against plain FedAvg of the same
updates, and docs/privacy.md reports its utility cost.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Quantization:
    clipping_range: float = 2.0
    quantization_range: int = 2**24
    modulus_range: int = 2**32
    max_weight: float = 10_000.0

    @property
    def step(self) -> float:
        """One quantisation step of a scaled update coordinate."""
        return 2 * self.clipping_range / self.quantization_range

    @property
    def max_hospitals(self) -> int:
        """Masked sums of more hospitals than this would wrap around the modulus."""
        return self.modulus_range // self.quantization_range - 1


QUANTIZATION = Quantization()

# The fit config key with the global model's state_dict names, in the order of the arrays
# (Flower's legacy Parameters have no names).
ARRAY_NAMES = "array-names"

# What a SecAgg+ reply may carry besides fedvox's `metrics` (without num-examples) and `node`
# (tests/test_secagg.py checks every reply the server receives against it).
SECAGG_REPLY_RECORDS = {
    "secaggplus_configs": "the stage's protocol values: public keys, encrypted key shares, "
    "the masked vector, unmask shares",
    "fitres.parameters": "empty: secaggplus_mod clears it once the vector is masked",
    "fitres.num_examples": "0: the weight travels inside the masked vector",
    "fitres.metrics": "empty",
    "fitres.status": "Flower's legacy status code (ok)",
}
