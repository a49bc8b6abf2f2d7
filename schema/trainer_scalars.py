"""Names of the `scalars` rows the built-in trainer writes, and what each means (for the data dictionary).

`scalars` is open-ended (any run.log keyword lands there), so these are documented here rather than as
columns. Query them like any scalar: SELECT step, value FROM scalars WHERE name = 'sharpness'.
"""

from __future__ import annotations

TRAINER_SCALARS: dict[str, str] = {
    # curvature at evaluation steps (--curvature; trainer/curvature.py)
    "sharpness": "Top eigenvalue of the Hessian of the training loss on a fixed sample of training examples "
                 "(power iteration with Hessian-vector products; Keskar et al.'s sharp vs flat minima).",
    "sharpness_iters": "Hessian-vector products the power iteration behind `sharpness` took.",
    "b_noise": "B_noise = tr(H Sigma)/(G'HG) (McCandlish et al. 2018) from one evaluation's 8 micro-batch "
               "gradients; no row when that evaluation's G'HG estimate is not positive. Average the raw "
               "b_noise_tr_h_sigma and b_noise_ghg over evaluations for a steadier value.",
    "b_noise_ghg": "Unbiased estimate of G'HG behind b_noise (one evaluation; may be negative).",
    "b_noise_tr_h_sigma": "Unbiased estimate of tr(H Sigma) behind b_noise.",
    "b_noise_g_sq": "Unbiased |G|^2 from the same micro-batch gradients (B_simple's denominator, for "
                    "comparing B_noise with B_simple on the same data).",
    "b_noise_tr_sigma": "Unbiased tr(Sigma) from the same micro-batch gradients (B_simple's numerator).",
    # how the plain noise scale was measured (trainer/noise.py), logged once at the first measured step
    "gns_per_example": "Share of the trainable parameter elements whose small batch is one example (per-example "
                       "gradient norms); the rest by micro-batches. 1.0 for the digits MLP and charlm.",
    # the noise scale Adam sees (--optimizer adam/adamw; trainer/adam_noise.py)
    "g_small_sq_adam": "Like steps.g_small_sq, for the preconditioned gradient P g with P = 1/(sqrt(v_hat) + eps) "
                       "from Adam's state (adaptdl's AdamGradientNoiseScale).",
    "b_small_adam": "Examples per small gradient behind g_small_sq_adam (micro-batches: B/2 at --accum 1).",
    "g_big_sq_adam": "Like steps.g_big_sq, for the preconditioned gradient.",
    "b_big_adam": "Examples in the big gradient behind g_big_sq_adam.",
    "b_simple_adam": "Running B_simple of the preconditioned gradient, tr(P Sigma P)/|P G|^2 (ratio of per-example "
                     "EMAs, as steps.b_simple).",
}
