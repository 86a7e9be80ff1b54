"""Self-supervised pretraining (SPAR and alternatives), heads and fine-tuning. Imports torch."""
