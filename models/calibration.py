"""Temperature scaling per missing pattern (Guo et al., 2017, "On Calibration of Modern Neural Networks", Sec. 4.2:
one scalar T > 0 dividing the logits, fitted by minimising the NLL on validation). A head is more or less sure of
itself depending on which modalities it sees, so one T is fitted for each set of present modalities (complete,
each modality gone) and a prediction uses the T of the modalities it was given. The argmax, hence accuracy, is
unchanged. This project's extension: the papers do not calibrate."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def presence_key(present: list[str]) -> str:
    """The name of a set of present modalities (an MLflow metric-name part): ``image_text``, ``text``."""
    return "_".join(present) or "none"


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, steps: int = 100) -> float:
    """The T minimising the cross-entropy of ``logits / T`` on labels ``y`` (LBFGS on log T, so T stays > 0)."""
    logits, y = logits.detach().float(), y.long()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one scalar over a few thousand logits: extra threads only wait on a busy machine
    try:                      # (24 ms a step with 2 threads under load, 0.08 ms with 1)
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return float(log_t.detach().exp().clamp(0.05, 20.0))
