"""Huang et al. NeurIPS 2022 (DIST): Pearson correlation of the softened probabilities, between the classes of each
sample and between the samples of each class. conf/loss/dist.yaml."""
import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import Criterion, Step, check_non_negative, check_temperature


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of a with the same row of b: cosine of the mean-centred rows.

    The eps is added to the product of the norms, as in the DIST reference (cosine_similarity in
    hunto/image_classification_sota, lib/models/losses/dist_kd.py, eps=1e-8), not to each norm.
    """
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_divergence(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, gamma: float, temperature: float
) -> Tensor:
    """Huang et al. NeurIPS 2022 (DIST): tau^2 * (beta * (1 - mean_i rho(Y_s[i,:], Y_t[i,:]))
    + gamma * (1 - mean_j rho(Y_s[:,j], Y_t[:,j]))), Y = softmax(z / tau), rho = Pearson correlation.

    The first term is the inter-class relation (each sample's row over the classes), the second the intra-class
    relation (each class's column over the batch), as in DIST_KD's classification/lib/models/losses/dist_kd.py
    (the hunto/image_classification_sota submodule). Its eps (see pearson_rows) makes identical logits give
    tau^2 * eps / (|y - mean y|^2 + eps) per row or column rather than 0: negligible, except for a class whose
    probability is near 0 in every sample of the batch, whose column then counts as uncorrelated (as there).
    """
    y_student = F.softmax(student_logits / temperature, dim=1)
    y_teacher = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1.0 - pearson_rows(y_student, y_teacher).mean()
    intra = 1.0 - pearson_rows(y_student.T, y_teacher.T).mean()
    return (beta * inter + gamma * intra) * temperature**2


class DISTLoss(Criterion):
    """Huang et al. NeurIPS 2022 (DIST): ce_weight * CE + tau^2 * (beta * L_inter + gamma * L_intra), L = 1 - Pearson.

    Its values are DIST's CIFAR-100 setting, with their sources: conf/loss/dist.yaml.
    """

    def __init__(self, ce_weight: float, beta: float, gamma: float, temperature: float):
        super().__init__()
        check_non_negative(ce_weight=ce_weight, beta=beta, gamma=gamma)
        check_temperature(temperature)
        self.ce_weight, self.beta, self.gamma = ce_weight, beta, gamma
        self.temperature = temperature

    def forward(self, step: Step) -> dict[str, Tensor]:
        student, teacher = step.student_logits, step.teacher_logits
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(student, step.targets),
            "loss_dist": dist_divergence(student, teacher, self.beta, self.gamma, self.temperature),
        }
