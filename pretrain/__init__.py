"""Pretraining machinery: data layer, MAE and CLIP trainers."""
