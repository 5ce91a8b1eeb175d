"""Config tables that one paradigm acts on: split learning, its compression, KD-FedLLM, FedLLM's client pruning."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from fedtune.comm.split_interfaces import SPLIT_INTERFACES
from fedtune.config.base import OwnedKeysSection, Section, registered
from fedtune.config.sections import ModelConfig


class SplitConfig(Section):
    cut: int = Field(3, ge=1, description="Blocks on the client (cut after this many blocks), unless `cuts` gives one per client.")
    cuts: list[int] | None = Field(None, description="Static per-client cut layers (one per client); overrides `cut`.")
    ushape: bool = Field(False, description="U-shape: the client also keeps the last `tail` blocks, final norm, LM head and labels.")
    tail: int = Field(1, ge=1, description="Blocks at the end kept on the client in U-shape.")
    server_adapter: Literal["shared", "per_client"] = Field(
        "shared", description="Server-side LoRA: one adapter updated by every client (SplitFed-V2) or one per client "
        "averaged each round (SplitFed-V1).")
    adaptive: bool = Field(False, description="SplitFT: after each round, clients above the mean validation quality "
                           "take more blocks, those below fewer.")
    gamma: float = Field(0.5, gt=0, description="Adaptive cut step: delta = round(gamma * (score - mean) / |mean| * L).")
    val_samples: int = Field(8, ge=1, description="Per-client validation samples (held out of its training data) that score the adaptive cut.")
    max_client_blocks: list[int] | None = Field(
        None, description="Per-client capacity bound on blocks held; none = from device profiles if set, else L - 1.")
    cut_policy: Literal["config", "profiles"] = Field(
        "config", description="Initial cuts from `cut`/`cuts` ('config'), or the most blocks each client's device "
        "fits ('profiles': memory measured per block, and the round time budget if set).")
    round_time_budget_s: float | None = Field(
        None, gt=0, description="With cut_policy 'profiles': a client's compute per round must fit in this many seconds.")
    cut_rank: int | None = Field(None, gt=0, description="Lower LoRA rank on the blocks adjacent to the cut; none = same as lora.r.")
    cut_rank_side: Literal["client", "server", "both"] = Field(
        "both", description="Which block adjacent to the cut gets cut_rank: the client's last, the server's first, or both.")


CODEC = "fedtune.compression.codecs:CODECS"


class InterfaceCompression(Section):
    """One split interface's own settings (``[compression.per_interface.<name>]``); unset keys take the table's."""

    codec: Annotated[str, registered(CODEC)] | None = Field(None, description="This interface's codec.")
    reuse: bool | None = Field(None, description="SplitCom reuse on this interface (method = 'splitcom'); false: "
                               "every step is sent, through the codec.")
    residual: bool | None = Field(None, description="Changed samples as residuals against the held copy.")
    error_feedback: bool | None = Field(None, description="Error feedback (only on an interface without reuse).")


class CompressionConfig(OwnedKeysSection):
    """Split-interface compression. Besides these keys, each threshold controller reads its own (its ``Settings``:
    bang-bang's ``theta_low``/``theta_high``/``tolerance``, DDPG's ``theta_min``/``theta_max``/``ddpg_lambda``/
    ``ddpg_sigma``, linear's ``theta_end``), which belong in this table too."""

    owners: ClassVar[str] = "fedtune.compression.controllers:CONTROLLERS"
    table: ClassVar[str] = "compression"

    method: Literal["none", "splitcom"] = Field(
        "none", description="'splitcom': temporal reuse (upload a sample's tensor only when it changed) on the split "
        "interfaces in `interfaces`; 'none': every tensor is sent.")
    interfaces: list[str] | None = Field(
        None, description="Split interfaces compressed: 'activations' (up), 'body_output' (down, U-shape), "
        "'tail_gradients' (up, U-shape), 'gradients' (down). Default: activations; all four in a U-shape.")
    metric: Annotated[str, registered("fedtune.compression.reuse:SIMILARITIES")] = Field(
        "cosine", description="Similarity of a sample's projected tensor to its cached projection: 'cosine' (of the "
        "whole sample, as in the paper), 'token_min' (the least similar token's cosine), 'token_mean' (the mean "
        "per-token cosine), or 'rel_l2' (1 - relative L2 change). A sample is reused when similarity >= theta.")
    projection_dim: int = Field(64, ge=1, description="Random projection size per token for the sender's cache.")
    cache_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Precision of the receiver's cache of full tensors.")
    cache_budget_mb: float | None = Field(
        None, gt=0, description="Memory budget of each receiver cache; past it entries spill to a memory-mapped file.")
    codec: Annotated[str, registered(CODEC)] = Field(
        "none", description="Codec for what is sent: 'none' (as is), 'fp16', 'bf16', 'int8' (per token, absmax "
        "scale), or 'int4' / 'int2' (per group of 64 values, absmax scale, packed). Padding is never sent once any "
        "compression is on.")
    residual: bool = Field(False, description="Send changed samples as a residual against the held copy (the sender then "
                           "also keeps full copies). The held copy is what the receiver decoded, so what the codec "
                           "dropped last time rides in the next residual: error feedback by construction.")
    error_feedback: bool = Field(
        False, description="On interfaces sent every step (no reuse), keep per sample what the codec dropped and add "
        "it to the sample's next send (EF-SGD style; for gradients).")
    entropy: Literal["none", "zstd"] = Field(
        "none", description="'zstd': each compressed message (payload, flags, mask, labels) travels as one zstd frame, "
        "counted at its compressed size.")
    per_interface: dict[str, InterfaceCompression] = Field(
        default_factory=dict, description="Per-interface overrides of codec, reuse, residual and error_feedback, e.g. "
        "[compression.per_interface.gradients] codec = 'int4', reuse = false, error_feedback = true; an interface "
        "named here is compressed even where `interfaces` leaves it out.")
    adapter_codec: Annotated[str, registered(CODEC)] = Field(
        "none", description="Codec of the client's LoRA upload at the end of its split session, sent as its change "
        "from what it downloaded (entropy-coded too when entropy is on).")
    adapter_download_codec: Annotated[str, registered(CODEC)] = Field(
        "none", description="Codec of the LoRA weights a split client downloads (sent as they are: the client keeps "
        "nothing between rounds); the client trains from what it decodes.")
    controller: Annotated[str, registered("fedtune.compression.controllers:CONTROLLERS")] = Field("fixed", description="Threshold controller: 'fixed', 'bangbang' (validation perplexity), "
                            "'ddpg', 'linear' (a schedule from theta to theta_end over the run), 'budget' (theta moved so each "
                            "session sends byte_budget of its uncompressed bytes).")
    theta: float = Field(0.999, ge=0, le=1, description="Threshold (fixed), and the start for ddpg and linear.")
    resend_budget: float | None = Field(None, gt=0, le=1, description="A cap on what a reusing interface re-sends: "
                                        "each client's sender earns this share of every batch's uncompressed bytes as "
                                        "credit, and re-sends the changed samples (below theta), least similar first, "
                                        "only while the credit covers their coded size (before entropy coding); "
                                        "unspent credit carries over. A sample's first send is free. none: theta "
                                        "alone decides.")
    thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="Per-interface fixed thresholds overriding theta.")

    @field_validator("interfaces")
    @classmethod
    def _interfaces(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if name not in SPLIT_INTERFACES:
                raise ValueError(f"unknown interface {name!r}; valid: {', '.join(SPLIT_INTERFACES)}")
        return v

    @field_validator("thresholds", "per_interface")
    @classmethod
    def _threshold_interfaces(cls, v: dict) -> dict:
        for name in v:
            if name not in SPLIT_INTERFACES:
                raise ValueError(f"unknown interface {name!r}; valid: {', '.join(SPLIT_INTERFACES)}")
        return v

    @model_validator(mode="after")
    def _feedback_without_reuse(self) -> "CompressionConfig":
        for name, o in self.per_interface.items():
            if o.error_feedback and self.method == "splitcom" and o.reuse is not False:
                raise ValueError(f"compression.per_interface.{name}: error_feedback is for an interface sent every "
                                 "step; set reuse = false there, or keep reuse and send residuals (residual = true), "
                                 "which feed the codec's error back already")
        return self

    @property
    def on(self) -> bool:
        """Whether any compression is asked for (reuse, a codec, entropy coding, an adapter codec)."""
        return (self.method != "none" or self.entropy != "none"
                or any(c != "none" for c in (self.codec, self.adapter_codec, self.adapter_download_codec))
                or any(o.codec not in (None, "none") for o in self.per_interface.values()))

    def controller_settings(self) -> Section:
        """The chosen controller's settings."""
        return self.settings_of(self.controller)


class KDConfig(Section):
    public_samples: int = Field(32, ge=1, description="KD-FedLLM public (proxy) prompt set: this many training samples "
                                "(a seeded choice) held out of every client's partition; clients share logits on them.")
    topk: int = Field(8, ge=0, description="Logits uploaded per public position: the top-k values (fp16) and indices "
                      "(int32); 0 = the full vocabulary (fp16). The server also sends down the top-k of the aggregate.")
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T (soft labels = softmax(logits / T)).")
    beta: float = Field(1.0, ge=0, description="Weight of the distillation term: CE(private) + beta * T^2 * KL(soft || own).")
    aggregation: Annotated[str, registered("fedtune.kd.aggregation:AGGREGATORS")] = Field("mean", description="How the server combines the clients' sparse distributions per "
                             "position: 'mean', or 'confidence' (each client weighted by its max probability).")
    distill_steps: int = Field(2, ge=0, description="Pure distillation steps on public batches each client runs per "
                               "round before its private steps, once soft labels exist (and the server model's steps).")
    server_model: bool = Field(False, description="The server keeps its own adapter, distilled from the aggregate each "
                               "round, and it is the evaluated model; otherwise the largest client's adapter is.")
    client_models: list[str] = Field(default_factory=list, description="Model each client runs (one name for all, "
                                     "or one per client): 'main' = the [model] section, or a name under "
                                     "[kd.models]; empty = every client runs [model]. Tokenizers must match.")
    models: dict[str, ModelConfig] = Field(default_factory=dict, description="Extra client models by name (same "
                                           "keys as [model]), e.g. a smaller model for weak devices.")



class PruningConfig(Section):
    rates: list[float] = Field(
        default_factory=list, description="FedLLM client-specific structured pruning rate rho_k in [0, 0.9]: one value "
        "for every client or one per client; empty or 0 = no pruning. A client with rho > 0 trains LoRA on a copy of "
        "the base model keeping round((1 - rho) * n) MLP channels / KV head groups per block; the server averages "
        "each adapter coordinate over the clients that kept it.")
    method: Annotated[str, registered("fedtune.models.pruning:PRUNING_METHODS")] = Field("activation", description="Importance score deciding what a client keeps: 'activation' "
                        "(Wanda-style: output-projection weight columns x input activation norms on "
                        "calibration_samples training samples), 'fluctuation' (FLAP-style: squared weight columns x "
                        "input activation variance, the error left after compensate), 'magnitude' (L2 norm of the "
                        "weights reading and writing each channel / KV group) or 'random' (seeded baseline).")
    compensate: bool = Field(False, description="Give each pruned output projection (MLP down_proj, attention "
                             "o_proj) a bias equal to the pruned input features' mean contribution on the calibration "
                             "samples (FLAP's baseline compensation), so a block's output is unchanged on average; "
                             "pairs with method 'fluctuation'. The bias is a frozen local weight: not trained, not sent.")
    calibration_samples: int = Field(32, ge=1, description="Training samples (a seeded draw, the same for every "
                                     "client) whose activations are measured once per run, for the calibrated "
                                     "methods ('activation', 'fluctuation') and for compensate.")
    targets: Literal["mlp", "heads", "both"] = Field(
        "mlp", description="What is pruned: MLP channels, attention heads (whole KV groups: a key/value head with its "
        "query heads), or both. Default 'mlp': with few KV groups (SmolLM2: 3) any head pruning drops a whole group, "
        "which costs far more quality than the same rate of MLP channels.")

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0.0 <= r <= 0.9]
        if bad:
            raise ValueError(f"pruning.rates entries must be in [0, 0.9], got {bad}")
        return v

