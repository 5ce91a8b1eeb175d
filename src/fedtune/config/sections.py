"""Config tables of the model, the data, local training, evaluation, the runtime and checkpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedtune.config.base import Section, registered


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
    source: Annotated[str, registered("fedtune.models.loading:MODEL_SOURCES")] = Field(
        "smollm2",
        description="Where the model comes from: 'smollm2' (bundled SmolLM2-135M-Instruct, offline), "
        "'pretrained' (Hugging Face id or local directory in `path`), 'tiny' (random tiny model for tests).",
    )
    path: str = Field("", description="Hugging Face model id or local directory (source = 'pretrained').")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype of the base model.")
    cache_dir: str = Field("", description="Cache for converted models and tokenizers (default ~/.cache/fedtune).")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of the tiny random model.")


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
    ranks: list[int] = Field(default_factory=list, description="FedLLM: one LoRA rank per client (each at most r, "
                             "the global rank); empty: every client trains rank r, unless profile_ranks applies.")
    profile_ranks: dict[str, int] = Field(default_factory=dict, description="FedLLM: LoRA rank per device profile "
                                          "name (e.g. {phone = 2, laptop = 8}): a client whose devices.profiles entry "
                                          "is listed trains that rank, the others rank r.")
    rank_aggregation: Annotated[str, registered("fedtune.federated.ranks:RANK_AGGREGATIONS")] = Field(
        "flexlora", description="How clients of different ranks are aggregated: 'zero_pad' (naive), 'hetlora' "
        "(zero-pad, per-component, norm-weighted, rank self-pruning), 'flexlora' (mean of the full-size updates, "
        "truncated SVD) or 'flora' (exact stacking, re-factorised to r each round).")
    self_prune_share: float = Field(0.01, ge=0, lt=1, description="hetlora: a client drops trailing rank components "
                                    "that carry less than this share of its update (0: never).")

    @model_validator(mode="after")
    def _ranks(self) -> "LoraConfig":
        if self.ranks and self.profile_ranks:
            raise ValueError("set lora.ranks or lora.profile_ranks, not both")
        for rank in [*self.ranks, *self.profile_ranks.values()]:
            if not 1 <= rank <= self.r:
                raise ValueError(f"lora client rank {rank} outside 1..{self.r} (lora.r, the global rank)")
        return self


class DataConfig(Section):
    dataset: Annotated[str, registered("fedtune.data.sources:DATASETS")] = Field(
        "e2e",
        description="'e2e' (bundled E2E NLG), 'chatterbot' (chatterbot-corpus Q&A), "
        "'local' (JSONL/CSV/parquet file in `path`), 'hf' (Hugging Face dataset name or dir in `path`).",
    )
    path: str = Field("", description="File (dataset = 'local') or dataset name/directory (dataset = 'hf').")
    eval_path: str = Field("", description="dataset = 'local': the held-out file (same type and field mapping as "
                           "`path`); empty: hold out eval_fraction of `path`, whole inputs at a time (rows sharing a "
                           "prompt stay on one side).")
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
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the data held out for eval when no eval "
                                 "split or file exists (drawn by input: rows sharing a prompt stay together).")
    max_train_samples: int | None = Field(None, gt=0, description="Cap on training samples (seeded subset); none = all.")
    max_eval_samples: int | None = Field(200, gt=0, description="Cap on eval samples (seeded subset); none = all.")
    max_length: int = Field(128, ge=8, description="Token window after formatting: a longer response is cut; a row "
                            "whose prompt alone fills it is dropped (counts in the partition report).")
    chat_template: bool = Field(True, description="Format with the tokenizer's chat template where it has one.")


    @model_validator(mode="after")
    def _path_needed(self) -> "DataConfig":
        if self.dataset in ("local", "hf") and not self.path:
            raise ValueError(f"data.path is required when data.dataset = {self.dataset!r}")
        if self.eval_path and self.dataset != "local":
            raise ValueError(f"data.eval_path is for data.dataset = 'local'; {self.dataset!r} has its own eval split "
                             "(hf: data.eval_split)")
        return self


class PartitionConfig(Section):
    method: Annotated[str, registered("fedtune.data.partition:PARTITIONERS")] = Field(
        "dirichlet",
        description="'iid', 'dirichlet' (Dirichlet over `column`), 'natural_id' (one client per value of `column`), "
        "'length_dirichlet' (SplitFT: Dirichlet over token-length classes).",
    )
    column: str = Field("", description="Column partitioned on (dirichlet, natural_id); default: the dataset's label column.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; small = highly non-IID.")
    num_length_classes: int = Field(4, ge=2, description="K token-length classes (length_dirichlet).")
    min_samples: int = Field(2, ge=1, description="Every client must get at least this many training samples.")



class TrainConfig(Section):
    lr: float = Field(2e-4, gt=0, description="Client (and centralized) learning rate, AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, gt=0, description="Samples per local step.")
    local_steps: int = Field(4, gt=0, description="Optimizer steps per client per round (ignored if local_epochs is set).")
    local_epochs: float | None = Field(None, gt=0, description="Passes over the client's data per round, overriding "
                                       "local_steps: round(local_epochs x its samples) samples in batches of "
                                       "batch_size, the last one smaller (1: each sample once a round).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; none = no clipping.")
    max_update_ratio: float | None = Field(100.0, gt=0, description=(
        "Reject a client's (or the server's) update when ||new - start|| > max_update_ratio * ||start||, start "
        "being the LoRA weights it started its turn from (norms over all of them together); none = no bound."))
    keep_optimizer_state: bool = Field(False, description=(
        "FedLLM: each client keeps its AdamW state (moments, step count) from its last turn instead of starting a "
        "fresh optimizer every round; it is the client's own (checkpointed; on a deployed client, kept on its "
        "machine)."))


class EvalConfig(Section):
    every: int = Field(1, ge=1, description="Evaluate on the held-out split every N rounds (and after the last).")
    batch_size: int = Field(16, gt=0, description="Eval batch size.")
    sample_index: int = Field(0, ge=0, description="Eval sample whose prompt is answered by the base and tuned model.")
    max_new_tokens: int = Field(40, gt=0, description="Tokens generated for the sample answer and the task metric.")
    metric: Annotated[str, registered("fedtune.metrics.task:TASK_METRICS", "auto", "none")] = Field("auto", description="Task metric by generation on held-out prompts, before training and "
                        "after: 'bleu_rouge' (BLEU and ROUGE-L), 'exact_match', 'none', or 'auto' (bleu_rouge for "
                        "e2e and other generation data, exact_match for chatterbot).")
    metric_samples: int = Field(16, ge=1, description="Distinct held-out prompts answered for the task metric (each "
                                "scored against all references the eval split has for that prompt).")



class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when present, else CPU.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; none = torch default (Ray workers: "
                                "cpus_per_client, at least 1).")
    progress: bool = Field(True, description="Show rich progress bars.")
    plots: bool = Field(True, description="Draw the run's eval_loss.png and partition.png (matplotlib; about 2 s "
                        "a run on a small CPU). false skips both (the report then links neither); `fedtune "
                        "report RUN_DIR` draws eval_loss.png later.")
    backend: Annotated[str, registered("fedtune.runtime:BACKENDS")] = Field("inprocess", description="Where client turns run: 'inprocess' (one after another in this "
                         "process, on one shared model), 'ray' (in parallel on a pool of Ray actors, each holding "
                         "its own copy of the model; same results) or 'flower' (deployed: each client's SuperNode, "
                         "inside a Flower ServerApp written by `fedtune deploy init`; same results).")
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
                                           "replaced); Flower: a client turn (a whole split session) without a "
                                           "reply by then is lost; none = no limit.")
    max_retries: int = Field(1, ge=0, description="Ray and Flower: when fewer than federation.min_clients replied in "
                             "a round, retry the lost turns (Ray: on fresh workers) this many times before stopping "
                             "the run.")
    start_timeout_s: float = Field(300.0, gt=0, description="Ray: seconds to wait for the worker pool to start "
                                   "(placement + model load) before stopping with an error.")


class DeployConfig(Section):
    secure_aggregation: bool = Field(False, description="FedLLM on runtime.backend = 'flower': sum the round's "
                                     "client adapters with Flower's SecAgg+ protocol, so the server learns only "
                                     "their sample-weighted mean (and each client's sample count and loss), never "
                                     "one client's adapter. Four message round trips per round; every strategy "
                                     "applies to the mean; no pruning, no simulated network.")
    secagg_threshold: float = Field(0.6, gt=0, le=1, description="SecAgg+: the fraction of a round's clients whose "
                                    "key shares must come back to unmask the sum; a round where fewer clients "
                                    "survive the key exchange halts (and is retried, runtime.max_retries).")
    secagg_clipping_range: float = Field(8.0, gt=0, description="SecAgg+: each weighted adapter value is clipped to "
                                         "this magnitude before quantisation; a client whose adapter exceeds it "
                                         "fails its turn with a clear error instead of being silently clipped.")
    secagg_quantization_range: int = Field(2**22, ge=2**8, description="SecAgg+: quantisation levels over the "
                                           "clipping range (Flower's default 2^22: steps of 4e-6 at range 8); the "
                                           "round's clients times this must stay below 2^32.")


class CheckpointConfig(Section):
    every: int = Field(1, ge=1, description="Write a checkpoint every N rounds (always after the last).")
    keep: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest are deleted).")
