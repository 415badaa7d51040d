"""usjax: contrastive self-supervised pre-training and U-Net fine-tuning for ultrasound segmentation in JAX."""

__version__ = "0.1.0"


class UsjaxError(Exception):
  """An error in what the user gave (config, data, paths): reported as one line, without a traceback."""
