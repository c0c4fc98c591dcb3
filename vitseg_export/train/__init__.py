"""checkpoint -> trained checkpoint: supervised training (training), quantization-aware fine-tuning (qat) and
fine-tuning after pruning (pruning_run)."""
