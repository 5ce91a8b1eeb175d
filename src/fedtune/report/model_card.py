"""The adapter's model card (``adapter/README.md``): what it was trained from, on what, how, how well, and how to
load it. Replaces PEFT's empty template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.core.files import atomic_write
from fedtune.report.render import format_bytes, fmt_num

LOADING = '''```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base_path = "{base}"
tokenizer = AutoTokenizer.from_pretrained(base_path)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), "{adapter}")
```'''


def _base(cfg, summary: dict[str, Any]) -> tuple[str, str]:
    """(where the base model is, a sentence about it)."""
    name = (summary.get("model") or {}).get("name") or cfg.model.path
    if cfg.model.source == "smollm2":
        return name, (f"SmolLM2-135M-Instruct (Apache-2.0), bundled with fedtune as a GGUF and converted once to "
                      f"safetensors at `{name}`")
    if cfg.model.source == "tiny":
        return name, ("a random tiny model fedtune builds for tests (`model.source = 'tiny'`): it has no weights on "
                      "disk, so this adapter loads only inside fedtune")
    return name, f"`{name}`"


def _data(cfg, summary: dict[str, Any]) -> str:
    d, part = cfg.data, cfg.partition
    source = d.dataset if d.dataset in ("e2e", "chatterbot") else f"{d.dataset} `{d.path}`"
    samples = sum(c.get("num_samples", 0) for c in summary.get("clients") or [])
    how = part.method + (f" (alpha {part.alpha:g})" if "dirichlet" in part.method else "")
    return (f"{source}: {samples} training samples over {cfg.federation.num_clients} clients, partitioned "
            f"{how}; prompts formatted {'with the chat template' if d.chat_template else 'as plain text'}, "
            f"{d.max_length} tokens at most")


def model_card(cfg, summary: dict[str, Any], adapter_dir: Path) -> str:
    """The card's markdown for the run ``summary`` of ``cfg``, whose adapter is in ``adapter_dir``."""
    base, about = _base(cfg, summary)
    initial, final = summary.get("initial") or {}, summary.get("final") or {}
    metrics = final.get("metrics") or {}
    before = initial.get("metrics") or {}
    scores = ", ".join(f"{k} {before.get(k, float('nan')):.1f} → {v:.1f}" for k, v in sorted(metrics.items()))
    comm = summary.get("comm") or {}
    lora, fed, train = cfg.lora, cfg.federation, cfg.train
    steps = f"{train.local_epochs:g} local epochs" if train.local_epochs else f"{train.local_steps} local steps"
    lines = [
        "---", f"base_model: {base}" if cfg.model.source != "tiny" else "base_model: null", "library_name: peft",
        f"tags: [fedtune, lora, federated-learning, {cfg.paradigm}]", "---", "",
        f"# {cfg.name}: a LoRA adapter trained with fedtune ({cfg.paradigm})", "",
        f"- **Base model**: {about}.",
        f"- **Data**: {_data(cfg, summary)}.",
        f"- **Training**: paradigm `{cfg.paradigm}`, {summary.get('rounds', fed.rounds)} rounds, strategy "
        f"`{fed.strategy}`, {steps} × batch {train.batch_size} at lr {train.lr:g}; LoRA r {lora.r}, alpha "
        f"{lora.alpha:g}, modules {', '.join(sorted(lora.target_modules)) if lora.target_modules else 'PEFT default'}"
        f"; seed {cfg.seed}.",
        f"- **Results** (held-out): eval loss {fmt_num(initial.get('eval_loss'))} → {fmt_num(final.get('eval_loss'))}"
        + (f"; {scores}" if scores else "") + ".",
        f"- **Communication**: {format_bytes(comm.get('uplink_bytes'))} up, "
        f"{format_bytes(comm.get('downlink_bytes'))} down in all.",
        "", "The run directory (`..`) holds `summary.json`, `metrics.jsonl` and `report.md` with every figure.", "",
        "## Load it", "", LOADING.format(base=base, adapter=Path(adapter_dir).resolve()), "",
    ]
    return "\n".join(lines)


def write_model_card(cfg, summary: dict[str, Any], adapter_dir: Path) -> Path:
    """Write ``adapter_dir/README.md`` (over PEFT's template); its path."""
    path = Path(adapter_dir) / "README.md"
    atomic_write(path, model_card(cfg, summary, adapter_dir).encode())
    return path
