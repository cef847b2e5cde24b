"""Learning-rate schedules that torch.optim.lr_scheduler does not offer in one object; stepped per epoch."""
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine(optimizer: Optimizer, epochs: int, warmup_epochs: int = 0, min_lr: float = 0.0) -> LambdaLR:
    """Linear warm-up over `warmup_epochs`, then cosine decay from the base lr to `min_lr` at `epochs`."""
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    def factor(epoch: int, base_lr: float) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / warmup_epochs
        progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
        cosine_factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return (min_lr + (base_lr - min_lr) * cosine_factor) / base_lr if base_lr else 1.0

    return LambdaLR(optimizer, [lambda e, lr=lr: factor(e, lr) for lr in base_lrs])


def constant(optimizer: Optimizer) -> LambdaLR:
    """The base learning rate throughout."""
    return LambdaLR(optimizer, lambda epoch: 1.0)
