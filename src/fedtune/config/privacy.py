"""The ``[privacy]`` table: client-level differential privacy, sample-level DP-SGD and split activation noise."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedtune.config.base import Section


class PrivacyConfig(Section):
    client_dp: Literal["none", "central", "local"] = Field("none", description=(
        "Client-level differential privacy of FedLLM and KD uploads: each client's update (its adapter minus the "
        "one it downloaded; KD: its probabilities at the server's candidate tokens) is clipped to clip_norm on the client, and Gaussian noise is added "
        "'central' = by the server to the round's unweighted mean (std noise_multiplier x clip / clients of the "
        "round; protects against whoever sees the model), or 'local' = by each client to its own upload (std "
        "noise_multiplier x clip; protects against the server too). 'none' = no DP."))
    clip_norm: float = Field(1.0, gt=0, allow_inf_nan=True, description="L2 bound C on each client's update (inf = no clipping; with "
                             "noise_multiplier 0 the run is then the non-private run bit for bit, uniform weights "
                             "aside). With adaptive_clip, the starting bound.")
    adaptive_clip: bool = Field(False, description="central: adapt clip_norm each round towards target_quantile of "
                                "the clients' update norms (Andrew et al. 2021, as Flower's adaptive clipping): the "
                                "clients report noised 'was I under the bound' bits, which the accountant counts.")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive_clip: share of clients meant to be under "
                                   "the bound.")
    clip_lr: float = Field(0.2, gt=0, description="adaptive_clip: geometric step of the bound per round "
                           "(C <- C exp(-clip_lr (b - target_quantile))).")
    clipped_count_stddev: float | None = Field(None, gt=0, description="adaptive_clip: noise std of the count of "
                                               "clients under the bound; none = clients per round / 20 (the paper's "
                                               "choice).")
    noise_multiplier: float | None = Field(None, ge=0, description="z: Gaussian noise std in units of the clip bound. "
                                           "none = calibrated from target_epsilon at delta over the planned rounds.")
    target_epsilon: float | None = Field(None, gt=0, description="epsilon the run may spend at delta. Without "
                                         "noise_multiplier the noise is calibrated to spend it over "
                                         "federation.rounds; with one, the run stops before a round that would "
                                         "exceed it (keeping its checkpoint).")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee; keep it below "
                         "1 / number of clients (client-level) or 1 / samples (sample-level).")
    sample_dp: bool = Field(False, description="Sample-level DP-SGD of each client's local LoRA training through "
                            "Opacus (per-sample gradients of the LoRA weights, clipped and noised); FedLLM only.")
    sample_noise_multiplier: float = Field(1.0, ge=0, description="sample_dp: noise std per step in units of "
                                           "sample_clip_norm.")
    sample_clip_norm: float = Field(1.0, gt=0, description="sample_dp: L2 bound on each sample's gradient.")
    activation_noise: float = Field(0.0, ge=0, description=(
        "Split learning: Gaussian noise on the activations a client uploads, std = activation_noise x the RMS of "
        "that batch's activations (a noise-to-signal ratio; 0 = none). A defence against reading the client's "
        "text back from them (fedtune probe leakage measures it)."))

    @model_validator(mode="after")
    def _settings_need_dp(self) -> "PrivacyConfig":
        if self.client_dp == "none":
            named = [k for k, on in (("adaptive_clip", self.adaptive_clip),
                                     ("noise_multiplier", self.noise_multiplier is not None),
                                     ("target_epsilon", self.target_epsilon is not None and not self.sample_dp))
                     if on]
            if named:
                raise ValueError(f"privacy.{named[0]} needs privacy.client_dp = 'central' or 'local' (it is 'none')")
        if self.adaptive_clip and self.client_dp == "local":
            raise ValueError("privacy.adaptive_clip adapts the bound from a noised count the server sums: it needs "
                             "client_dp = 'central'")
        if self.client_dp != "none" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("privacy.client_dp needs privacy.noise_multiplier or privacy.target_epsilon")
        return self

    @property
    def client_level(self) -> bool:
        return self.client_dp != "none"
