"""Models: loading (bundled SmolLM2, pretrained, tiny random), tokenizers, LoRA, FLOPs, memory, generation."""
