"""Typed run configuration: TOML file + ``--set key=value`` overrides, validated before any work.

Every field carries its help text (``fedtune config`` prints them). Errors name the key and what is
allowed; :func:`load_config` raises :class:`ConfigError`, never a raw validation traceback.
"""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedtune.errors import ConfigError


def _registry(path: str):
    """Import ``module:NAME`` lazily (validation time), so config has no import-time dependencies."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _choice(registry_path: str, value: str, extra: tuple[str, ...] = ()) -> str:
    """``value`` if the registry (or ``extra``, e.g. 'none') has it, else an error listing the valid choices."""
    registry = _registry(registry_path)
    if value not in registry and value not in extra:
        raise ValueError(f"unknown {registry.kind} {value!r}; valid choices: {', '.join([*extra, *registry.names()])}")
    return value


class Section(BaseModel):
    """A config table: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    arch: Literal["llama", "gpt2", "qwen2"] = Field("llama", description="Architecture family of the tiny random model.")
    hidden_size: int = Field(64, gt=0, description="Hidden size of the tiny model.")
    num_layers: int = Field(4, ge=2, description="Number of transformer blocks.")
    num_heads: int = Field(4, gt=0, description="Attention heads (must divide hidden_size).")
    intermediate_size: int = Field(128, gt=0, description="MLP width.")
    vocab_size: int = Field(512, ge=300, description="Vocabulary of the byte-level BPE tokenizer trained offline for it.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        return self


class ModelConfig(Section):
    source: str = Field(
        "smollm2",
        description="Where the model comes from: 'smollm2' (bundled SmolLM2-135M-Instruct, offline), "
        "'pretrained' (Hugging Face id or local directory in `path`), 'tiny' (random tiny model for tests).",
    )
    path: str = Field("", description="Hugging Face model id or local directory (source = 'pretrained').")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype of the base model.")
    cache_dir: str = Field("", description="Cache for converted models and tokenizers (default ~/.cache/fedtune).")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of the tiny random model.")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _choice("fedtune.models.loading:MODEL_SOURCES", v)

    @model_validator(mode="after")
    def _path_needed(self) -> "ModelConfig":
        if self.source == "pretrained" and not self.path:
            raise ValueError("model.path is required when model.source = 'pretrained'")
        return self


class LoraConfig(Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: PEFT's default for the architecture (attention q/v)."
    )


class DataConfig(Section):
    dataset: str = Field(
        "e2e",
        description="'e2e' (bundled E2E NLG), 'chatterbot' (chatterbot-corpus Q&A), "
        "'local' (JSONL/CSV/parquet file in `path`), 'hf' (Hugging Face dataset name or dir in `path`).",
    )
    path: str = Field("", description="File (dataset = 'local') or dataset name/directory (dataset = 'hf').")
    format: Literal["auto", "prompt_response", "instruction", "text"] = Field(
        "auto",
        description="How records map to prompt/response: prompt_response, instruction (instruction/input/output), "
        "text (plain language modelling), or auto (detect from the field names).",
    )
    prompt_field: str = Field("prompt", description="Prompt column (format prompt_response).")
    response_field: str = Field("response", description="Response column (format prompt_response).")
    instruction_field: str = Field("instruction", description="Instruction column (format instruction).")
    input_field: str = Field("input", description="Optional input column (format instruction).")
    output_field: str = Field("output", description="Output column (format instruction).")
    text_field: str = Field("text", description="Text column (format text).")
    train_split: str = Field("train", description="Split used for training (dataset = 'hf').")
    eval_split: str = Field("", description="Held-out split (dataset = 'hf'); empty: carve eval_fraction off train.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the data held out for eval when no eval split exists.")
    max_train_samples: int | None = Field(None, gt=0, description="Cap on training samples (seeded subset); none = all.")
    max_eval_samples: int | None = Field(200, gt=0, description="Cap on eval samples (seeded subset); none = all.")
    max_length: int = Field(128, ge=8, description="Token length after formatting; longer samples are truncated.")
    chat_template: bool = Field(True, description="Format with the tokenizer's chat template where it has one.")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return _choice("fedtune.data.sources:DATASETS", v)

    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.dataset in ("local", "hf") and not self.path:
            raise ValueError(f"data.path is required when data.dataset = {self.dataset!r}")
        return self


class PartitionConfig(Section):
    method: str = Field(
        "dirichlet",
        description="'iid', 'dirichlet' (Dirichlet over `column`), 'natural_id' (one client per value of `column`), "
        "'length_dirichlet' (SplitFT: Dirichlet over token-length classes).",
    )
    column: str = Field("", description="Column partitioned on (dirichlet, natural_id); default: the dataset's label column.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; small = highly non-IID.")
    num_length_classes: int = Field(4, ge=2, description="K token-length classes (length_dirichlet).")
    min_samples: int = Field(2, ge=1, description="Every client must get at least this many training samples.")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _choice("fedtune.data.partition:PARTITIONERS", v)


class TrainConfig(Section):
    lr: float = Field(2e-4, gt=0, description="Client (and centralized) learning rate, AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, gt=0, description="Samples per local step.")
    local_steps: int = Field(4, gt=0, description="Optimizer steps per client per round (ignored if local_epochs is set).")
    local_epochs: float | None = Field(None, gt=0, description="Epochs over the client's data per round; overrides local_steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; none = no clipping.")


class FederationConfig(Section):
    num_clients: int = Field(4, ge=1, description="Number of simulated clients (partitions).")
    clients_per_round: int | None = Field(None, ge=1, description="Clients sampled each round; none = all.")
    min_clients: int = Field(1, ge=1, description="A round completes when at least this many of its sampled clients "
                             "replied (with the Ray backend a turn can be lost to a dead or late worker); at most "
                             "clients_per_round.")
    rounds: int = Field(3, ge=1, description="Federated rounds.")
    strategy: str = Field("fedavg", description="Server aggregation strategy: 'fedavg', 'fedprox', 'fedadam'.")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal coefficient mu.")
    server_lr: float = Field(1e-2, gt=0, description="Server learning rate (fedadam).")
    server_betas: tuple[float, float] = Field((0.9, 0.99), description="Server Adam betas (fedadam).")
    server_eps: float = Field(1e-3, gt=0, description="Server Adam epsilon / adaptivity tau (fedadam).")

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        return _choice("fedtune.federated.strategies:STRATEGIES", v)

    @model_validator(mode="after")
    def _sampling(self) -> "FederationConfig":
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({self.clients_per_round}) exceeds "
                f"federation.num_clients ({self.num_clients}); allowed: 1..{self.num_clients}"
            )
        if self.min_clients > self.sampled:
            raise ValueError(f"federation.min_clients ({self.min_clients}) exceeds the {self.sampled} clients sampled "
                             f"per round; allowed: 1..{self.sampled}")
        return self

    @property
    def sampled(self) -> int:
        return self.clients_per_round or self.num_clients


class CustomDevice(Section):
    flops_per_s: float = Field(gt=0, description="Sustained training throughput, FLOP/s.")
    memory_gb: float = Field(gt=0, description="Memory available for training, GB (10^9 bytes).")
    tx_power_w: float = Field(0.2, gt=0, description="Uplink transmit power, W.")


class DevicesConfig(Section):
    profiles: list[str] = Field(
        default_factory=list, description="Device per client (one name for all, or one per client): presets "
        "'phone', 'jetson', 'laptop', 'workstation', or a name defined under [devices.custom].")
    custom: dict[str, CustomDevice] = Field(default_factory=dict, description="Your own device profiles by name.")


class NetworkConfig(Section):
    """The simulated wireless network that turns bytes and FLOPs into seconds (off while planner = 'none')."""

    planner: str = Field(
        "none", description="Simulated wireless network and its per-round plan: 'none' (no network: simulated time "
        "is 0), 'equal' (equal bandwidth, no pruning), 'bandwidth_only', 'pruning_only', 'uniform_pruning', or "
        "'jcpba' (per-client pruning rates and bandwidth shares minimising round latency). Every other [network] "
        "key has a default.")
    bandwidth_hz: float = Field(20e6, gt=0, description="Total uplink band B shared by a round's clients (FDMA "
                                "shares), Hz; the downlink broadcast uses all of it.")
    noise_dbm_per_hz: float = Field(-174.0, description="Noise power spectral density N0, dBm/Hz.")
    path_loss_ref_db: float = Field(128.1, description="Path loss at path_loss_ref_m, dB (default: 3GPP urban "
                                    "macro, 128.1 + 37.6 log10(d / 1 km)).")
    path_loss_ref_m: float = Field(1000.0, gt=0, description="Reference distance of path_loss_ref_db, m.")
    path_loss_exponent: float = Field(3.76, gt=0, description="Path-loss exponent n: "
                                      "PL(d) = path_loss_ref_db + 10 n log10(d / path_loss_ref_m).")
    fading: str = Field("rayleigh", description="Block fading, redrawn every round: 'rayleigh' (|h|^2 ~ Exp(1)) or "
                        "'none' (path loss only).")
    distances_m: list[float] = Field(
        default_factory=list, description="Client distances to the server, m (one for all, or one per client); "
        "empty: drawn once (seeded), uniformly over the area between min_distance_m and max_distance_m.")
    min_distance_m: float = Field(50.0, gt=0, description="Inner radius of the drawn client positions, m.")
    max_distance_m: float = Field(500.0, gt=0, description="Outer radius of the drawn client positions, m.")
    server_tx_power_w: float = Field(20.0, gt=0, description="Server transmit power of the downlink broadcast, W "
                                     "(clients' uplink power comes from their device profiles).")
    deadline_s: float | None = Field(None, gt=0, description="Round deadline, simulated seconds: a client finishing "
                                     "later is a straggler, left out of the round's aggregate (FedLLM) and counted; "
                                     "in FedLLM a client that could not meet it even alone on the whole band is left "
                                     "out before the round (out of reach). none = wait for every client.")
    rho_max: float = Field(0.5, ge=0, le=0.9, description="Largest pruning rate the planner may give a client.")
    mean_rho_budget: float = Field(0.3, ge=0, le=0.9, description="Quality constraint: the mean pruning rate over a "
                                   "round's clients stays within this.")
    latency_slack: float = Field(0.02, ge=0, le=1, description="JCPBA: round latency accepted above the fastest "
                                 "plan (a fraction of it) in exchange for less pruning: the plan is the least total "
                                 "pruning that meets it. 0: the fastest plan, pruning only where it buys time.")
    energy_pj_per_flop: float = Field(5.0, ge=0, description="Client compute energy per FLOP, pJ (energy = uplink "
                                      "power x upload seconds + this x FLOPs); 0 counts radio energy only.")

    @field_validator("planner")
    @classmethod
    def _planner(cls, v: str) -> str:
        return _choice("fedtune.network.planner:PLANNERS", v, extra=("none",))

    @field_validator("fading")
    @classmethod
    def _fading(cls, v: str) -> str:
        return _choice("fedtune.network.channel:FADING", v)

    @field_validator("distances_m")
    @classmethod
    def _distances(cls, v: list[float]) -> list[float]:
        bad = [d for d in v if not d > 0]
        if bad:
            raise ValueError(f"network.distances_m entries must be > 0 m, got {bad}")
        return v

    @model_validator(mode="after")
    def _ring(self) -> "NetworkConfig":
        if self.min_distance_m >= self.max_distance_m:
            raise ValueError(f"network.min_distance_m ({self.min_distance_m}) must be below "
                             f"network.max_distance_m ({self.max_distance_m})")
        return self

    @property
    def enabled(self) -> bool:
        return self.planner != "none"


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


INTERFACES = ("activations", "body_output", "tail_gradients", "gradients")


class CompressionConfig(Section):
    method: Literal["none", "splitcom"] = Field(
        "none", description="'splitcom': temporal reuse (upload a sample's tensor only when it changed) on the split "
        "interfaces in `interfaces`; 'none': every tensor is sent.")
    interfaces: list[str] | None = Field(
        None, description="Split interfaces compressed: 'activations' (up), 'body_output' (down, U-shape), "
        "'tail_gradients' (up, U-shape), 'gradients' (down). Default: activations; all four in a U-shape.")
    metric: Literal["cosine", "rel_l2"] = Field(
        "cosine", description="Similarity of a sample's projected tensor to its cached projection: cosine, or "
        "1 - relative L2 change. A sample is reused when similarity >= theta.")
    projection_dim: int = Field(64, ge=1, description="Random projection size per token for the sender's cache.")
    cache_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Precision of the receiver's cache of full tensors.")
    cache_budget_mb: float | None = Field(
        None, gt=0, description="Memory budget of each receiver cache; past it entries spill to a memory-mapped file.")
    codec: Literal["none", "fp16", "int8"] = Field(
        "none", description="Codec for what is sent: as is, fp16, or int8 per token (absmax scale). Padding is never sent "
        "once any compression is on.")
    residual: bool = Field(False, description="Send changed samples as a residual against the held copy (the sender then "
                           "also keeps full copies).")
    controller: str = Field("fixed", description="Threshold controller: 'fixed', 'bangbang' (validation perplexity), 'ddpg'.")
    theta: float = Field(0.999, description="Threshold (fixed), and the start for ddpg.")
    thresholds: dict[str, float] = Field(default_factory=dict, description="Per-interface fixed thresholds overriding theta.")
    theta_low: float = Field(0.99, description="Bang-bang lax threshold (used while perplexity does not rise).")
    theta_high: float = Field(0.9999, description="Bang-bang strict threshold (after perplexity rose).")
    tolerance: float = Field(0.01, ge=0, description="Bang-bang: relative perplexity rise that triggers the strict threshold.")
    theta_min: float = Field(0.95, description="DDPG action range, lower end.")
    theta_max: float = Field(0.99999, description="DDPG action range, upper end.")
    ddpg_lambda: float = Field(1.0, ge=0, description="DDPG reward weight of bytes: r = -loss - lambda * bytes_sent / bytes_full.")
    ddpg_sigma: float = Field(0.1, ge=0, description="DDPG Gaussian exploration noise (in the [-1, 1] action space).")

    @field_validator("controller")
    @classmethod
    def _controller(cls, v: str) -> str:
        return _choice("fedtune.compression.controllers:CONTROLLERS", v)

    @field_validator("interfaces")
    @classmethod
    def _interfaces(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if name not in INTERFACES:
                raise ValueError(f"unknown interface {name!r}; valid: {', '.join(INTERFACES)}")
        return v


class KDConfig(Section):
    public_samples: int = Field(32, ge=1, description="KD-FedLLM public (proxy) prompt set: this many training samples "
                                "(a seeded choice) held out of every client's partition; clients share logits on them.")
    topk: int = Field(8, ge=0, description="Logits uploaded per public position: the top-k values (fp16) and indices "
                      "(int32); 0 = the full vocabulary (fp16). The server also sends down the top-k of the aggregate.")
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T (soft labels = softmax(logits / T)).")
    beta: float = Field(1.0, ge=0, description="Weight of the distillation term: CE(private) + beta * T^2 * KL(soft || own).")
    aggregation: str = Field("mean", description="How the server combines the clients' sparse distributions per "
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

    @field_validator("aggregation")
    @classmethod
    def _aggregation(cls, v: str) -> str:
        return _choice("fedtune.kd.aggregation:AGGREGATORS", v)


class PruningConfig(Section):
    rates: list[float] = Field(
        default_factory=list, description="FedLLM client-specific structured pruning rate rho_k in [0, 0.9]: one value "
        "for every client or one per client; empty or 0 = no pruning. A client with rho > 0 trains LoRA on a copy of "
        "the base model keeping round((1 - rho) * n) MLP channels / KV head groups per block; the server averages "
        "each adapter coordinate over the clients that kept it.")
    method: str = Field("activation", description="Importance score deciding what a client keeps: 'activation' "
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

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _choice("fedtune.models.pruning:PRUNING_METHODS", v)


class EvalConfig(Section):
    every: int = Field(1, ge=1, description="Evaluate on the held-out split every N rounds (and after the last).")
    batch_size: int = Field(16, gt=0, description="Eval batch size.")
    sample_index: int = Field(0, ge=0, description="Eval sample whose prompt is answered by the base and tuned model.")
    max_new_tokens: int = Field(40, gt=0, description="Tokens generated for the sample answer and the task metric.")
    metric: str = Field("auto", description="Task metric by generation on held-out prompts, before training and "
                        "after: 'bleu_rouge' (BLEU and ROUGE-L), 'exact_match', 'none', or 'auto' (bleu_rouge for "
                        "e2e and other generation data, exact_match for chatterbot).")
    metric_samples: int = Field(16, ge=1, description="Distinct held-out prompts answered for the task metric (each "
                                "scored against all references the eval split has for that prompt).")

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        return _choice("fedtune.metrics.task:TASK_METRICS", v, extra=("auto", "none"))


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when present, else CPU.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; none = torch default (Ray workers: "
                                "cpus_per_client, at least 1).")
    progress: bool = Field(True, description="Show rich progress bars.")
    plots: bool = Field(True, description="Draw the run's eval_loss.png and partition.png (matplotlib; about 2 s "
                        "a run on a small CPU). false skips both (the report then links neither); `fedtune "
                        "report RUN_DIR` draws eval_loss.png later.")
    backend: str = Field("inprocess", description="Where client turns run: 'inprocess' (one after another in this "
                         "process, on one shared model) or 'ray' (in parallel on a pool of Ray actors, each holding "
                         "its own copy of the model; same results).")
    address: str = Field("", description="Ray: '' starts a private Ray instance on this machine (loopback only, "
                         "stopped at the end); 'auto' joins the cluster started on this machine with `ray start`; "
                         "'HOST:PORT' joins the cluster whose head is there.")
    auth_token_path: str = Field("", description="Ray: file holding the cluster's authentication token; sets "
                                 "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH. Empty: Ray's own settings apply "
                                 "(RAY_AUTH_MODE, RAY_AUTH_TOKEN[_PATH], ~/.ray/auth_token).")
    workers: int | None = Field(None, ge=1, description="Ray: worker actors in the pool; none = as many as the "
                                "cluster fits (CPUs / cpus_per_client, GPUs / gpus_per_client), at most the clients "
                                "sampled per round (split learning, whose sessions run one at a time: at most 2).")
    cpus_per_client: float = Field(1.0, gt=0, description="Ray: CPUs each worker actor reserves (fractions allowed).")
    gpus_per_client: float = Field(0.0, ge=0, description="Ray: GPUs each worker actor reserves; a fraction shares "
                                   "one GPU (0.25: four workers per GPU); 0 = none.")
    server_cpus: float = Field(1.0, gt=0, description="Ray, split learning: CPUs the server's worker actor reserves.")
    server_gpus: float = Field(0.0, ge=0, description="Ray, split learning: GPUs the server's worker actor reserves "
                               "(e.g. 1 to run the body blocks on a GPU node).")
    client_timeout_s: float | None = Field(1800.0, gt=0, description="Ray: a client turn (in split learning: one "
                                           "call of a session) running longer is lost (its worker is killed and "
                                           "replaced); none = no limit.")
    max_retries: int = Field(1, ge=0, description="Ray: when fewer than federation.min_clients replied in a round, "
                             "retry the lost turns on fresh workers this many times before stopping the run.")
    start_timeout_s: float = Field(300.0, gt=0, description="Ray: seconds to wait for the worker pool to start "
                                   "(placement + model load) before stopping with an error.")

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        return _choice("fedtune.runtime:BACKENDS", v)


class CheckpointConfig(Section):
    every: int = Field(1, ge=1, description="Write a checkpoint every N rounds (always after the last).")
    keep: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest are deleted).")


class RunConfig(Section):
    paradigm: str = Field("fedllm", description="'fedllm' (federated LoRA), 'split' (split federated, SplitFed/SplitFT), "
                          "'kd' (KD-FedLLM: clients share top-k logits on a public set), 'centralized' "
                          "(reference, no federation) or 'local' (baseline: each client trains alone, no exchange).")
    seed: int = Field(0, description="Seed of every random choice in the run.")
    name: str = Field("run", description="Run name, used in reports.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @field_validator("paradigm")
    @classmethod
    def _paradigm(cls, v: str) -> str:
        return _choice("fedtune.paradigms:PARADIGMS", v)

    @model_validator(mode="after")
    def _split_lists(self) -> "RunConfig":
        n = self.federation.num_clients
        for key in ("cuts", "max_client_blocks"):
            values = getattr(self.split, key)
            if values is not None and len(values) != n:
                raise ValueError(f"split.{key} has {len(values)} entries but federation.num_clients = {n}; give one per client")
            if values is not None and min(values) < 1:
                raise ValueError(f"split.{key} entries must be >= 1, got {values}")
        if self.compression.method != "none" or self.compression.codec != "none":
            if self.paradigm != "split":
                raise ValueError(f"compression applies to the split interfaces; paradigm is {self.paradigm!r}")
            bad = [i for i in self.compression.interfaces or [] if i in ("body_output", "tail_gradients")]
            if bad and not self.split.ushape:
                raise ValueError(f"compression.interfaces {bad} exist only in a U-shape split (split.ushape = true)")
        if self.split.cut_policy == "profiles" and not self.devices.profiles:
            raise ValueError("split.cut_policy = 'profiles' needs devices.profiles")
        if self.split.cut_rank is not None and (self.split.cuts is not None or self.split.adaptive):
            raise ValueError("split.cut_rank needs one fixed cut (split.cut): with per-client or adaptive cuts the "
                             "blocks adjacent to the cut differ between clients and rounds")
        rates = self.pruning.rates
        if len(rates) not in (0, 1, n):
            raise ValueError(f"pruning.rates has {len(rates)} entries but federation.num_clients = {n}; "
                             "give one rate for all clients or one per client")
        if any(rates) and self.paradigm != "fedllm":
            raise ValueError(f"pruning.rates applies to paradigm 'fedllm'; paradigm is {self.paradigm!r}")
        names, known = self.kd.client_models, {"main", *self.kd.models}
        if names and self.paradigm != "kd":
            raise ValueError(f"kd.client_models applies to paradigm 'kd'; paradigm is {self.paradigm!r}")
        if len(names) not in (0, 1, n):
            raise ValueError(f"kd.client_models has {len(names)} entries but federation.num_clients = {n}; "
                             "give one name for all clients or one per client")
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"kd.client_models: unknown model(s) {unknown}; valid: {', '.join(sorted(known))} "
                             "(define others under [kd.models.NAME])")
        if self.split.cut_rank is not None and self.split.cut_rank > self.lora.r:
            raise ValueError(f"split.cut_rank ({self.split.cut_rank}) must not exceed lora.r ({self.lora.r})")
        return self

    @model_validator(mode="after")
    def _runtime_backend(self) -> "RunConfig":
        _registry("fedtune.runtime:BACKENDS").get(self.runtime.backend).check_config(self)
        return self

    @model_validator(mode="after")
    def _network_lists(self) -> "RunConfig":
        n, d = self.federation.num_clients, self.network.distances_m
        if len(d) not in (0, 1, n):
            raise ValueError(f"network.distances_m has {len(d)} entries but federation.num_clients = {n}; "
                             "give one distance for all clients or one per client")
        return self

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value); the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not isinstance(p, int))
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        section = _section_at(loc[:-1])
        valid = ", ".join(section.model_fields) if section else "?"
        where = f"[{'.'.join(map(str, loc[:-1]))}]" if loc[:-1] else "the top level"
        return f"unknown key {key!r}; valid keys in {where}: {valid}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if err["type"] in ("value_error",) or isinstance(got, dict):
        return f"{key}: {msg}"
    return f"{key}: {msg} (got {got!r})"


def build_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML file (optional), apply ``--set`` overrides, and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for text in overrides:
        apply_override(data, *parse_override(text))
    return build_config(data)


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for ``fedtune config`` and the README."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, key + "."))
        else:
            rows.append((key, repr(field.get_default(call_default_factory=True)), field.description or ""))
    return rows
