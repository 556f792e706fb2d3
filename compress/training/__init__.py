"""Training: fine-tuning and pretraining loops (precision, distillation, schedulers) and data-parallel training
under torchrun.
"""
