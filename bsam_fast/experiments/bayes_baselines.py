"""The paper's Bayesian baselines, each from a maintained package where one fits:

* IVON (PyPI ``ivon-opt``; the successor of VOGN by the same group): a variational
  optimizer; trained with one MC sample per step, predicts by averaging samples.
* SWAG (Maddox et al., 2019): no package fits our loop (torch-uncertainty brings a
  Lightning stack), so it is written here: SGD, then moments of the iterates over the last
  quarter of training (constant learning rate there); diagonal + rank-K covariance.
* Laplace (PyPI ``laplace-torch``): post hoc at the SGD solution, last-layer, Kronecker
  factored GGN, prior precision by marginal likelihood; probit predictive.

The packages are imported when a method is used, with an error that says how to install
them (``.ci/setup`` does).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters


def _need(package: str, pip_name: str):
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"this baseline needs {pip_name}: pip install {pip_name} "
                          "(laplace-torch with --no-deps next to a CPU torch; see .ci/setup)") from exc


def make_ivon(params, lr: float, num_data: int, prior_precision: float, hess_init: float = 1.0):
    """IVON (beta2 0.99999, its default) with ess = N and weight decay delta = prior
    precision / N, as bSAM's: posterior N(m, 1/(N (h + delta))), h starting at hess_init."""
    ivon = _need("ivon", "ivon-opt")
    return ivon.IVON(params, lr=lr, ess=num_data, weight_decay=prior_precision / num_data, hess_init=hess_init)


class SWAG:
    """SWA-Gaussian: mean, diagonal and the last ``rank`` deviations of the collected
    iterates; a sample is mean + sqrt(diag/2)*z1 + D z2 / sqrt(2 (K-1))."""

    def __init__(self, model: nn.Module, rank: int = 10):
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError("SWAG here does not recompute BatchNorm statistics for its samples "
                             "(Maddox et al.'s bn_update): use it with models without BatchNorm")
        self.model, self.rank = model, rank
        self.n = 0
        vec = parameters_to_vector(model.parameters()).detach()
        self.mean = torch.zeros_like(vec)
        self.sq_mean = torch.zeros_like(vec)
        self.deviations: list[Tensor] = []

    @torch.no_grad()
    def collect(self) -> None:
        w = parameters_to_vector(self.model.parameters()).detach()
        self.n += 1
        self.mean += (w - self.mean) / self.n
        self.sq_mean += (w * w - self.sq_mean) / self.n
        self.deviations = (self.deviations + [w - self.mean])[-self.rank:]

    @torch.no_grad()
    def sample_into_model(self, generator: torch.Generator) -> None:
        if self.n < 2:
            raise RuntimeError("SWAG needs at least two collected iterates")
        diag = (self.sq_mean - self.mean ** 2).clamp_min(1e-30)
        z1 = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        w = self.mean + (0.5 * diag).sqrt() * z1
        if len(self.deviations) > 1:
            d = torch.stack(self.deviations, 1)
            z2 = torch.randn(d.shape[1], generator=generator, dtype=self.mean.dtype)
            w += d @ z2 / (2 * (len(self.deviations) - 1)) ** 0.5
        vector_to_parameters(w, self.model.parameters())

    @torch.no_grad()
    def predict(self, x: Tensor, samples: int, seed: int, batch_size: int = 1024) -> Tensor:
        """Softmax probabilities averaged over SWAG samples; the SWA mean afterwards."""
        from ..predict import probabilities, eval_mode
        gen = torch.Generator().manual_seed(seed)
        total = 0
        with eval_mode(self.model):
            for _ in range(samples):
                self.sample_into_model(gen)
                total = total + probabilities(self.model, x, batch_size)
        vector_to_parameters(self.mean, self.model.parameters())
        return total / samples


def fit_laplace(model: nn.Module, x: Tensor, y: Tensor, batch: int = 256):
    """Last-layer KFAC Laplace at the model's parameters, prior precision by marglik;
    None when training diverged (non-finite parameters have no Hessian to decompose)."""
    laplace = _need("laplace", "laplace-torch")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return None
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    la = laplace.Laplace(model, "classification", subset_of_weights="last_layer",
                         hessian_structure="kron")
    try:
        la.fit(loader)
    except SystemExit:      # laplace-torch calls exit() when an eigendecomposition fails
        raise RuntimeError("laplace-torch could not decompose the last layer's Hessian") from None
    la.optimize_prior_precision(method="marglik")
    return la


@torch.no_grad()
def predict_laplace(la, x: Tensor, batch_size: int = 1024) -> Tensor:
    """The GLM predictive with the probit approximation."""
    return torch.cat([la(x[i:i + batch_size], pred_type="glm", link_approx="probit")
                      for i in range(0, len(x), batch_size)])
