"""Fine-tuning: LoRA/QLoRA adapters on the fused projections, PEFT files, classification heads, merge."""
