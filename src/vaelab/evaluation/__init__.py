"""Evaluation of a trained model: the test-split report `evaluate` (report.py), the importance-sampled NLL
(nll.py), latent metrics (metrics.py), and per-sample anomaly scores (scores.py).

`loss_terms` (and its fixed seed EVAL_SEED), the validation pass that `evaluate` reports, lives in the training
layer (vaelab.training.validation), because the training loop validates with it; it is re-exported here.

The names of this package are imported lazily (as vaelab's own), so that importing one of its modules stays
cheap: vaelab.anomaly takes the score names from vaelab.evaluation.scores while the CLI answers `vaelab --help`
without importing torch.
"""

__all__ = ["EVAL_SEED", "evaluate", "loss_terms"]


def __getattr__(name):
    if name == "evaluate":
        from vaelab.evaluation.report import evaluate

        return evaluate
    if name in ("loss_terms", "EVAL_SEED"):
        from vaelab.training import validation

        return getattr(validation, name)
    raise AttributeError(f"module 'vaelab.evaluation' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
