"""Trainer: learns GenCLIP prompts offline and evaluates them like the zero-shot papers."""
