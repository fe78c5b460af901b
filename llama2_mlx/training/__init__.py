"""Fine-tuning: SFT data and batches, the trainer, schedules and resumable checkpoints."""
