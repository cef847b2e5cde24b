"""Knowledge distillation for image classification: data, models, losses and the training engine."""
