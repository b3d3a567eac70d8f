"""Evaluation of pretrained towers: linear probing, zero-shot classification, fine-tuning."""
